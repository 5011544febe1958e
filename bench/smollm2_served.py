"""SmolLM2-135M-Instruct served on this machine (1 prefill + 1 decode node, CPU) beside
transformers' ``generate`` on the same chat prompts, in float32 and then bfloat16::

    python -m bench.smollm2_served [--concurrency 1 8 32] [--tokens 64] [--chats-per-stream 2]
        [--min-chats 8] [--dtypes float32 bfloat16] [--hf-threads 1] [--quick]

Served: C concurrent ZeroMQ streams in a closed loop (a stream sends its next chat when
its last one finished) until the point's chats are done; TTFT and TPOT are measured at
the client from the streamed chunks. transformers: the same prompts (same token ids) in
left-padded batches of C, greedy, the same number of new tokens; its TTFT is the time
from the batch's start to its first generated token (a stopping criterion records when
each step's token is out), its TPOT the rest of the batch's time per further token.
Both sides produce exactly ``--tokens`` tokens per chat (EOS ignored) so they do the same
work. The two sides run alternately per point (served C, transformers C, next C) so
that drift in the shared machine's load hits both alike; the load average is printed
per point.

Threads: the served system's two node processes get one torch thread each (two
processes on two cores; while decoding, only the decode node computes), and
transformers runs in this process with ``--hf-threads`` (default 1, the decode node's
one thread). On this shared, oversubscribed 2-core machine two OpenMP threads for
transformers were far slower than one in check runs (their barrier waits stall when the
other thread is descheduled), so one thread is both the like-for-like and the faster
choice here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.served_load import pct
from bench.served_process import wait_for_address
from bench.smollm2_dtype import QUESTIONS

MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True, slots=True)
class Point:
    """One side's measurements at one concurrency: per-chat TTFT and TPOT (s), tokens
    generated in all and the point's wall time."""

    ttft: list[float]
    tpot: list[float]
    tokens: int
    wall: float
    outputs: dict[int, list[int]]  # chat index -> its generated token ids

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall


def serve(dtype: str, address_file: Path, log_dir: Path) -> None:
    """The served system on SmolLM2 in ``dtype``; writes its client address when ready."""
    import logging

    logging.disable(logging.WARNING)
    from disagg.serve import ServedCluster, ServeOptions

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = ServedCluster(
        ServeOptions(
            model=MODEL,
            dtype=dtype,
            port=0,
            num_blocks=512,
            threads_per_node=1,
            log_dir=str(log_dir),
        )
    ).start()
    address_file.write_text(cluster.client_address)
    stop.wait()
    cluster.stop(drain_timeout=5)


async def served_point(address: str, prompts: list[list[int]], concurrency: int,
                       tokens: int) -> Point:  # fmt: skip
    from disagg.client import AsyncClient

    ttft: list[float] = []
    tpot: list[float] = []
    produced = 0
    outputs: dict[int, list[int]] = {}
    queue = list(reversed(list(enumerate(prompts))))

    async with AsyncClient(address, timeout=900) as client:

        async def stream(k: int) -> None:
            nonlocal produced
            while queue:
                index, prompt = queue.pop()
                start = time.perf_counter()
                first = last = start
                count = 0
                ids: list[int] = []
                async for chunk in client.stream(
                    prompt, client_id=f"chat{k}", max_tokens=tokens, temperature=0,
                    ignore_eos=True,
                ):  # fmt: skip
                    last = time.perf_counter()
                    if count == 0:
                        first = last
                    count += len(chunk.token_ids)
                    ids += chunk.token_ids
                outputs[index] = ids
                ttft.append(first - start)
                tpot.append((last - first) / max(count - 1, 1))
                produced += count

        t0 = time.perf_counter()
        await asyncio.gather(*(stream(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return Point(ttft, tpot, produced, wall, outputs)


def hf_point(model, tokenizer, prompts: list[list[int]], batch: int, tokens: int) -> Point:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        """Records when each step's token is out; never stops generation."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ttft: list[float] = []
    tpot: list[float] = []
    produced = 0
    outputs: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        enc = tokenizer.pad({"input_ids": group}, padding=True, return_tensors="pt")
        clock = StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList([clock]),
            )  # fmt: skip
        new = out.shape[1] - enc["input_ids"].shape[1]
        assert new == tokens and len(clock.times) == tokens, (new, len(clock.times))
        first, last = clock.times[0], clock.times[-1]
        ttft += [first - start] * len(group)
        tpot += [(last - first) / max(tokens - 1, 1)] * len(group)
        produced += new * len(group)
        for j, seq in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
            outputs[i + j] = seq
    return Point(ttft, tpot, produced, time.perf_counter() - t0, outputs)


def row(side: str, dtype: str, c: int, p: Point, load: float) -> str:
    return (
        f"  {dtype:<9} {c:>3} {side:<12} {len(p.ttft):>5} {p.tokens_per_s:>7.1f} "
        f"{pct(p.ttft, 50) * 1e3:>8.0f} {pct(p.ttft, 90) * 1e3:>7.0f} "
        f"{pct(p.tpot, 50) * 1e3:>8.1f} {pct(p.tpot, 90) * 1e3:>7.1f} {p.wall:>7.1f} {load:>5.1f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--tokens", type=int, default=64, help="output tokens per chat")
    p.add_argument("--chats-per-stream", type=int, default=2)
    p.add_argument("--min-chats", type=int, default=8, help="at least this many chats a point")
    p.add_argument("--quick", action="store_true",
                   help="16 tokens, one chat per stream, at least 4 chats a point")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--hf-threads", type=int, default=1)
    p.add_argument("--serve", nargs=3, metavar=("DTYPE", "ADDRESS_FILE", "LOG_DIR"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.tokens, args.chats_per_stream, args.min_chats = 16, 1, 4
    if args.serve:
        serve(args.serve[0], Path(args.serve[1]), Path(args.serve[2]))
        return

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from disagg.engine.chat_template import load_chat_template
    from disagg.engine.model_source import resolve_model_dir

    torch.set_num_threads(args.hf_threads)
    model_dir = resolve_model_dir(MODEL)
    template = load_chat_template(MODEL)
    assert template is not None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chats = [template.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    token_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]

    print(
        f"{MODEL}: served (1 prefill + 1 decode node, 1 torch thread each) vs transformers "
        f"generate ({args.hf_threads} threads), {args.tokens} output tokens per chat, greedy"
    )
    header = (f"  {'dtype':<9} {'C':>3} {'side':<12} {'chats':>5} {'tok/s':>7} "
              f"{'TTFT p50':>8} {'p90':>7} {'TPOT p50':>8} {'p90':>7} {'wall s':>7} {'load':>5}")  # fmt: skip
    lines = [header]
    ratios: list[str] = []
    for dtype in args.dtypes:
        tmp = Path(tempfile.mkdtemp(prefix="disagg-smolserved-"))
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.smollm2_served", "--serve", dtype,
             str(tmp / "address"), str(tmp / "logs")],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        try:
            # Loads while the served system starts (both read the same cached directory).
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            model.eval()
            address = wait_for_address(server, tmp / "address", timeout=300)
            asyncio.run(served_point(address, token_ids[:2], 2, 4))  # warm-up
            hf_point(model, tokenizer, token_ids[:2], 2, 4)
            for c in args.concurrency:
                n = max(args.min_chats, c * args.chats_per_stream)
                prompts = [token_ids[k % len(token_ids)] for k in range(n)]
                served = asyncio.run(served_point(address, prompts, c, args.tokens))
                lines.append(row("served", dtype, c, served, os.getloadavg()[0]))
                print(lines[-1], flush=True)
                hf = hf_point(model, tokenizer, prompts, c, args.tokens)
                lines.append(row("transformers", dtype, c, hf, os.getloadavg()[0]))
                print(lines[-1], flush=True)
                same = sum(served.outputs[k] == hf.outputs[k] for k in range(n))
                ratios.append(
                    f"  {dtype:<9} C={c:<3} served / transformers tokens/s "
                    f"x{served.tokens_per_s / hf.tokens_per_s:.2f}; greedy outputs identical "
                    f"{same}/{n}"
                )
            del model
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print("\n" + "\n".join(lines))
    print("\n".join(ratios))
    print(json.dumps({"loadavg_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
