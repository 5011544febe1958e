"""Engine throughput against Hugging Face transformers, side by side in one run.

    python -m bench.engine [--models tiny,medium] [--num-prompts 64] [--device cpu|cuda]

The same prompts (random token ids, 16-512 tokens) and per-prompt output lengths go
through ``LLM.generate`` (continuous batching, paged KV) and through transformers'
batched ``generate`` (left-padded, one batch, run to the longest output). Both are
greedy with EOS ignored, so both produce exactly the requested tokens; throughput counts
only those requested tokens. Each side runs ``--repeats`` times, alternating, and the
median time is kept. On CUDA it also measures the decode step of a ~1B-parameter
Llama at batch 1 against the memory-bandwidth bound (weight bytes / HBM bandwidth).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from disagg import LLM, SamplingParams
from disagg.engine.tiny_model import tiny_model_path

# A ~30M-parameter Llama shape, random weights: matmuls dominate, yet it runs in about
# a minute on 2 CPU cores.
MEDIUM = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
# A ~1.2B-parameter Llama shape (Llama-3.2-1B-like) for the GPU bandwidth check.
ONE_B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
)
# Published HBM bandwidths (bytes/s) by device-name fragment.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 3.0e11, "A10": 6.0e11}


@dataclass
class Result:
    model: str
    device: str
    num_prompts: int
    prompt_tokens: int
    output_tokens: int
    engine_s: float
    transformers_s: float

    @property
    def engine_tok_s(self) -> float:
        return self.output_tokens / self.engine_s

    @property
    def transformers_tok_s(self) -> float:
        return self.output_tokens / self.transformers_s

    @property
    def speedup(self) -> float:
        return self.transformers_s / self.engine_s


def make_workload(
    n: int, vocab: int, max_output_len: int, seed: int = 0
) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 512))] for _ in range(n)]
    output_lens = [rng.randint(16, max_output_len) for _ in range(n)]
    return prompts, output_lens


def write_random_llama(shape: dict, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**shape, dtype=dtype)).to(dtype)
    model.save_pretrained(path)
    return path


class EngineSide:
    def __init__(self, path: str, device: str):
        self.llm = LLM(path, device=device)
        self.device = device
        self.llm.generate([[5] * 16] * 2, SamplingParams(temperature=0, max_tokens=4))  # warm-up

    def run(self, prompts: list[list[int]], output_lens: list[int]) -> float:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
        _sync(self.device)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        assert [len(o.token_ids) for o in outs] == output_lens
        return elapsed


class TransformersSide:
    def __init__(self, path: str, device: str):
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.device = device
        self.kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():  # warm-up
            self.model.generate(
                torch.full((2, 16), 5, device=device), max_new_tokens=4, **self.kwargs
            )

    def run(self, prompts: list[list[int]], output_lens: list[int]) -> float:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        new = max(output_lens)
        with torch.no_grad():
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.model.generate(
                ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=new,
                min_new_tokens=new,
                **self.kwargs,
            )
            _sync(self.device)
            elapsed = time.perf_counter() - t0
        assert out.shape[1] == width + new
        return elapsed


def bench_model(
    name: str, num_prompts: int, max_output_len: int, repeats: int, device: str, workdir: Path
) -> Result:
    if name == "tiny":
        path = str(tiny_model_path())
        vocab = 2048
    elif name == "medium":
        path = str(write_random_llama(MEDIUM, workdir / "medium"))
        vocab = MEDIUM["vocab_size"]
    else:
        raise SystemExit(f"unknown model {name!r}: choose tiny or medium")
    prompts, output_lens = make_workload(num_prompts, vocab, max_output_len)
    engine, hf = EngineSide(path, device), TransformersSide(path, device)
    # Alternate the two so that machine noise falls on both alike; keep the median.
    engine_s, hf_s = [], []
    for _ in range(repeats):
        engine_s.append(engine.run(prompts, output_lens))
        hf_s.append(hf.run(prompts, output_lens))
    return Result(
        name,
        device,
        num_prompts,
        sum(map(len, prompts)),
        sum(output_lens),
        statistics.median(engine_s),
        statistics.median(hf_s),
    )


def bench_decode_roofline(workdir: Path) -> dict:
    """Batch-1 decode step of a ~1B Llama in bfloat16 with CUDA graphs, against the time
    to read every weight once from HBM."""
    path = write_random_llama(ONE_B, workdir / "llama-1b", torch.bfloat16)
    llm = LLM(str(path), device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=2048)
    engine = llm.engine
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    seq = engine.add_request(
        list(range(3, 131)), SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    )
    engine.step()  # prefill
    for _ in range(20):  # warm-up decode steps
        engine.step()
    torch.cuda.synchronize()
    steps = 200
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    engine.abort(seq.seq_id)
    name = torch.cuda.get_device_name()
    spec_bw = next((bw for key, bw in HBM_BANDWIDTH.items() if key in name), None)
    copy_bw = _measured_copy_bandwidth()
    bound_s = weight_bytes / (spec_bw or copy_bw)
    return {
        "device": name,
        "weight_bytes": weight_bytes,
        "decode_step_ms": step_s * 1e3,
        "hbm_spec_bytes_per_s": spec_bw,
        "measured_copy_bytes_per_s": copy_bw,
        "bandwidth_bound_ms": bound_s * 1e3,
        "ratio_to_bound": step_s / bound_s,
    }


def _measured_copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)  # read + write


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,medium", help="comma-separated: tiny, medium")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument(
        "--max-output-len", type=int, default=256, help="output lengths are uniform in [16, this]"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the median is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        results = [
            bench_model(
                m, args.num_prompts, args.max_output_len, args.repeats, args.device, Path(tmp)
            )
            for m in args.models.split(",")
        ]
        roofline = bench_decode_roofline(Path(tmp)) if args.device.startswith("cuda") else None

    if args.json:
        print(
            json.dumps(
                {
                    "results": [
                        asdict(r)
                        | {
                            "engine_tok_s": r.engine_tok_s,
                            "transformers_tok_s": r.transformers_tok_s,
                            "speedup": r.speedup,
                        }
                        for r in results
                    ],
                    "decode_roofline": roofline,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{'model':8} {'device':6} {'prompts':>7} {'in tok':>7} {'out tok':>7} "
        f"{'engine tok/s':>12} {'HF tok/s':>9} {'speedup':>8}"
    )
    for r in results:
        print(
            f"{r.model:8} {r.device:6} {r.num_prompts:7d} {r.prompt_tokens:7d} {r.output_tokens:7d} "
            f"{r.engine_tok_s:12.1f} {r.transformers_tok_s:9.1f} {r.speedup:7.2f}x"
        )
    if roofline:
        print(
            f"\n1B decode, batch 1, CUDA graphs on {roofline['device']}: "
            f"{roofline['decode_step_ms']:.3f} ms/step; bound {roofline['bandwidth_bound_ms']:.3f} ms "
            f"({roofline['weight_bytes'] / 1e9:.2f} GB of weights) -> {roofline['ratio_to_bound']:.2f}x the bound"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
