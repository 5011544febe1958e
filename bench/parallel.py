"""Decode step time of the parallel engine on this machine, side by side in one run:
tp = 1 (one process, all cores) against tp = 2 (two gloo ranks, one core each), and
pp = 2 with and without decode micro-batches; with tp = 2, the share of each rank's
step spent in all-reduce (including waiting for the other rank to get there).

    python -m bench.parallel [--model tiny|small|DIR] [--batch 8] [--context 128]
                             [--steps 10] [--rounds 4] [--layouts 1x1,1x1-t1,2x1,1x2,1x2-nomb]

Every engine stays up for the whole run and the layouts take turns, ``--steps`` decode
steps each per round, so machine noise (the machine may be shared) falls on all of them
alike; the median step time over all rounds is reported. A step is ``LLMEngine.step()``
(schedule, run, sample, stop rules), as the offline engine runs it. ``small`` is a
transformers-written random Llama (hidden 1024, 8 layers, 16 heads / 4 KV heads, ~106 M
parameters, float32) built once into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from disagg import LLM, SamplingParams


@dataclass
class Row:
    layout: str
    step_ms: float
    vs_tp1: float
    reduce_share: float | None
    reduce_calls_per_step: float | None


def _small_model(root: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    path = root / "small-llama"
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _layout(name: str) -> tuple[int, int, bool]:
    base, _, flag = name.partition("-")
    tp, pp = (int(x) for x in base.split("x"))
    return tp, pp, flag != "nomb"


def _threads(name: str) -> int:
    """Torch threads of the leader process: all cores, or one for ``1x1-t1``."""
    return 1 if name.endswith("-t1") else os.cpu_count() or 1


def _start(model: str, name: str, batch: int, context: int, steps: int, rounds: int) -> LLM:
    tp, pp, micro = _layout(name)
    blocks = batch * (-(-(context + steps * rounds + 8) // 16)) + 4
    llm = LLM(
        model,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        num_blocks=blocks,
        max_num_seqs=batch,
    )
    if tp * pp > 1:
        llm.engine.worker.decode_micro_batches = pp if micro else 1
    vocab = llm.engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    seqs = [
        llm.engine.add_request(torch.randint(3, vocab, (context,), generator=gen).tolist(), params)
        for _ in range(batch)
    ]
    while any(not s.output_token_ids for s in seqs):  # prefill them all: then only decodes
        llm.engine.step()
    return llm


def _reduce(llm: LLM) -> tuple[float, int]:
    worker = llm.engine.worker
    if not hasattr(worker, "group"):
        return 0.0, 0
    stats = worker.group.stats()
    return statistics.mean(s.reduce_seconds for s in stats), round(
        statistics.mean(s.reduce_calls for s in stats)
    )


def run(args) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        model = str(_small_model(Path(tmp))) if args.model == "small" else args.model
        names = args.layouts.split(",")
        llms = {
            n: _start(model, n, args.batch, args.context, args.steps, args.rounds) for n in names
        }
        try:
            times: dict[str, list[float]] = {n: [] for n in names}
            reduce_s = dict.fromkeys(names, 0.0)
            calls = dict.fromkeys(names, 0)
            for _ in range(args.rounds):
                for n, llm in llms.items():
                    torch.set_num_threads(_threads(n))  # what a tp = 1 engine computes with
                    r0, c0 = _reduce(llm)
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        llm.engine.step()
                        times[n].append((time.perf_counter() - t0) * 1e3)
                    r1, c1 = _reduce(llm)
                    reduce_s[n] += r1 - r0
                    calls[n] += c1 - c0
        finally:
            for llm in llms.values():
                llm.close()
    base = statistics.median(times[names[0]])
    rows = []
    for n in names:
        ms = statistics.median(times[n])
        total_steps = args.steps * args.rounds
        parallel = _layout(n)[0] > 1
        rows.append(
            Row(
                layout=n,
                step_ms=ms,
                vs_tp1=ms / base,
                reduce_share=reduce_s[n] * 1e3 / sum(times[n]) if parallel else None,
                reduce_calls_per_step=calls[n] / total_steps if parallel else None,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny', 'small' or a model directory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--layouts",
        default="1x1,1x1-t1,2x1,1x2,1x2-nomb",
        help="TPxPP; -nomb: pp without decode micro-batches; 1x1-t1: one torch thread. "
        "The first is the base of the ratios",
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print(
        f"model {args.model}, batch {args.batch}, context {args.context}, "
        f"{args.steps} steps x {args.rounds} rounds, {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"{'layout':<12} {'step ms':>8} {'vs first':>8} {'all-reduce':>10} {'reduces/step':>12}")
    for r in rows:
        share = "-" if r.reduce_share is None else f"{100 * r.reduce_share:.0f} %"
        calls = "-" if r.reduce_calls_per_step is None else f"{r.reduce_calls_per_step:.0f}"
        print(f"{r.layout:<12} {r.step_ms:>8.2f} {r.vs_tp1:>8.2f} {share:>10} {calls:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
