#!/usr/bin/env bash
# The one-shot GPU check: everything about the CUDA path that CPU tests cannot show, in
# one run of under 8 minutes on one GPU, ending with one summary.
#
#   bash scripts/gpu-check.sh            # from anywhere; the repository is found from here
#
# Checks: versions; the Triton kernels on the GPU (float32/float16/bfloat16, GQA, long
# contexts, block ids whose offsets pass 2^31 elements); the engine against transformers
# on CUDA; decode CUDA graphs replayed and equal to eager; the served system on this one
# GPU (a prefill and a decode node, KV over CUDA IPC) equal to the offline engine; CUDA
# IPC and the local backend on GPU caches; with 4 GPUs, served rank groups (prefill tp 2
# -> decode pp 2, KV over NCCL rank pair by rank pair; skipped with fewer). Goals, measured: a batch-1 decode step of a
# ~1B model against the HBM roofline (goal <= 1.5x), and a CUDA IPC hand-off against a
# device-to-device copy of the same bytes (goal >= 70 %).
#
# Set-up: a venv at $DISAGG_GPU_VENV (default .venv-gpu) made with the system's site
# packages, so a CUDA build of torch already on the machine is used; the project is
# installed into it in editable mode, and only what is missing is fetched.
#
# Exit status: 0 every check passed and every goal was met; 1 a check failed (or the
# set-up did); 2 every check passed but a goal was missed. Without a CUDA GPU it says so
# and exits 0 having checked nothing.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu-check: no CUDA GPU on this machine (nvidia-smi finds none): nothing to check"
    exit 0
fi

budget_s="${GPU_CHECK_BUDGET_S:-450}"  # all steps together; each also has its own cap
start_s=$SECONDS
summary=()
failed=0
missed=0
logs="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"

record() {  # status, what, detail
    summary+=("$(printf '%-12s %-58s %s' "$1" "$2" "$3")")
    case "$1" in FAIL) failed=1 ;; "GOAL MISSED") missed=1 ;; esac
}

finish() {
    echo
    echo "==================== gpu-check summary ($((SECONDS - start_s)) s) ===================="
    printf '%s\n' "${summary[@]}"
    echo "logs: $logs"
    if [ "$failed" = 1 ]; then exit 1; fi
    if [ "$missed" = 1 ]; then exit 2; fi
    exit 0
}

# -- set-up ----------------------------------------------------------------------------
venv="${DISAGG_GPU_VENV:-$repo/.venv-gpu}"
base_python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[gpu-check] creating $venv (with the system's site packages)"
    if ! "$base_python" -m venv --system-site-packages "$venv" >"$logs/setup.log" 2>&1; then
        record FAIL "set-up: venv" "see $logs/setup.log"
        finish
    fi
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[gpu-check] no CUDA build of torch visible: installing torch"
    "${pip[@]}" install "torch>=2.4" >>"$logs/setup.log" 2>&1
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    record FAIL "set-up: torch with CUDA" "nvidia-smi sees a GPU, torch does not ($logs/setup.log)"
    finish
fi
missing="$("$py" - <<'EOF'
import importlib.util
need = {"transformers": "transformers>=4.45", "pytest": "pytest>=8", "zmq": "pyzmq>=25",
        "pydantic": "pydantic>=2.5", "safetensors": "safetensors>=0.4",
        "tokenizers": "tokenizers>=0.19", "yaml": "pyyaml>=6", "triton": "triton>=3.0",
        "prometheus_client": "prometheus-client>=0.20", "hypothesis": "hypothesis>=6.100",
        "numpy": "numpy>=1.26", "matplotlib": "matplotlib>=3.7", "uvloop": "uvloop>=0.19",
        "jinja2": "jinja2"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
EOF
)"
if [ -n "$missing" ]; then
    echo "[gpu-check] installing what is missing: $missing"
    # shellcheck disable=SC2086  # one argument per requirement
    "${pip[@]}" install $missing >>"$logs/setup.log" 2>&1 \
        || { record FAIL "set-up: dependencies" "could not install: $missing"; finish; }
fi
if ! "$py" -c "import disagg, kv_transfer, disagg_kernels" 2>/dev/null \
    || [ "$("$py" -c 'import disagg, os; print(os.path.dirname(os.path.dirname(disagg.__file__)))')" != "$repo" ]; then
    "${pip[@]}" install --no-deps --no-build-isolation -e "$repo" >>"$logs/setup.log" 2>&1 \
        || { record FAIL "set-up: install disagg" "see $logs/setup.log"; finish; }
fi
export PYTHONPATH="$repo"

# -- checks ----------------------------------------------------------------------------
remaining() { echo $((budget_s - (SECONDS - start_s))); }

step() {  # name, cap (s), command...: PASS/FAIL with pytest's last line (or the tail)
    local name="$1" cap="$2"
    shift 2
    local left
    left="$(remaining)"
    if [ "$left" -le 5 ]; then
        record FAIL "$name" "not run: the ${budget_s} s budget is spent"
        return
    fi
    [ "$cap" -gt "$left" ] && cap="$left"
    local log="$logs/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log" t0=$SECONDS
    echo "[gpu-check] $name (up to $cap s)"
    timeout --kill-after=10 "$cap" "$@" >"$log" 2>&1
    local rc=$?
    local last
    last="$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -1 | tr -s '= ' ' ')"
    [ -z "$last" ] && last="$(tail -1 "$log")"
    if [ "$rc" = 0 ]; then
        record PASS "$name" "${last} [$((SECONDS - t0)) s]"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        record FAIL "$name" "timed out after $cap s ($log)"
    else
        record FAIL "$name" "${last} ($log)"
    fi
}

versions="$("$py" - <<'EOF' 2>&1
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
try:
    import torch.cuda.nccl as nccl_mod
    v = nccl_mod.version()
    nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
except Exception as e:  # reported, not fatal: versions are information
    nccl = f"unknown ({type(e).__name__})"
p = torch.cuda.get_device_properties(0)
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {tv}, NCCL {nccl}; {torch.cuda.device_count()} x {p.name} "
      f"({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
EOF
)"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
record INFO "versions" "$versions; driver $driver"

step "kernels on GPU: f32/f16/bf16, GQA, long ctx, ids > 2^31" 100 \
    "$py" -m pytest -q -p no:cacheprovider tests/kernels
step "engine vs transformers on CUDA; graphs replayed = eager" 100 \
    "$py" -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py
step "KV transfer on GPU (CUDA IPC, local; NCCL needs 2 GPUs)" 60 \
    "$py" -m pytest -q -p no:cacheprovider tests/kv_transfer/test_cuda.py
step "served on one GPU (prefill + decode over CUDA IPC) = offline" 120 \
    "$py" -m pytest -q -p no:cacheprovider tests/runtime/test_served_cuda.py -k one_gpu
step "served rank groups tp2 -> pp2 over NCCL = offline (needs 4 GPUs)" 120 \
    "$py" -m pytest -q -p no:cacheprovider tests/runtime/test_served_cuda.py -k rank_groups

goal() {  # name, cap, python snippet printing "value ok|missed detail"
    local name="$1" cap="$2" code="$3" left log="$logs/$(echo "$1" | tr -c 'a-zA-Z0-9\n' '_').log"
    left="$(remaining)"
    if [ "$left" -le 5 ]; then
        record FAIL "$name" "not run: the ${budget_s} s budget is spent"
        return
    fi
    [ "$cap" -gt "$left" ] && cap="$left"
    echo "[gpu-check] $name (up to $cap s)"
    timeout --kill-after=10 "$cap" "$py" -c "$code" >"$log" 2>&1
    local rc=$? verdict
    verdict="$(grep '^RESULT ' "$log" | tail -1)"
    if [ "$rc" != 0 ] || [ -z "$verdict" ]; then
        record FAIL "$name" "did not run to the end (rc $rc, $log)"
    elif [[ "$verdict" == "RESULT met "* ]]; then
        record "GOAL MET" "$name" "${verdict#RESULT met }"
    else
        record "GOAL MISSED" "$name" "${verdict#RESULT missed }"
    fi
}

goal "decode step, batch 1, ~1B bf16 vs HBM roofline (<= 1.5x)" 90 '
import tempfile
from pathlib import Path
from bench.engine import bench_decode_roofline
with tempfile.TemporaryDirectory() as tmp:
    r = bench_decode_roofline(Path(tmp))
ratio, step, bound = r["ratio_to_bound"], r["decode_step_ms"], r["bandwidth_bound_ms"]
name = r["device"]
print(r)
print("RESULT", "met" if ratio <= 1.5 else "missed",
      f"{step:.3f} ms/step = {ratio:.2f}x the {bound:.3f} ms bound on {r["device"]}")
'

goal "CUDA IPC hand-off vs D2D copy of the same bytes (>= 70 %)" 60 '
from bench.kv_transfer import CASES, run
rows = run("cuda_ipc", [CASES["8b-bf16-1k"], CASES["8b-bf16-4k"]], 5, 1, 4)
for r in rows:
    print(r)
worst = min(rows, key=lambda r: r.best_ratio)
print("RESULT", "met" if worst.best_ratio >= 0.7 else "missed",
      ", ".join(f"{r.case} {r.best_ratio:.0%} ({r.paged_best_gbps:.0f} vs {r.raw_best_gbps:.0f} GB/s)" for r in rows))
'

finish
