"""SmolLM2-135M-Instruct on this machine in float32 and bfloat16, side by side in one run:
prefill and decode speed through the offline engine, and how far bfloat16's greedy
answers stay with float32's.

    python -m bench.smollm2_dtype [--rounds 3] [--batch 8] [--tokens 32]

Rounds alternate the two dtypes (f32, bf16, f32, bf16, ...) so that drift in the
machine's load hits both alike; the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from disagg import LLM, SamplingParams
from disagg.engine.chat_template import load_chat_template

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Give me three tips for learning to cook.",
    "What does a compiler do?",
    "Write a haiku about autumn leaves.",
    "How do vaccines work?",
    "What is the difference between weather and climate?",
    "Explain photosynthesis to a child.",
    "Name the planets of the solar system.",
    "What is a prime number?",
    "How does a bicycle stay upright?",
    "What causes the seasons on Earth?",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    template = load_chat_template(MODEL)
    assert template is not None
    prompts = [template.render([{"role": "user", "content": q}]) for q in QUESTIONS[: args.batch]]
    llms = {name: LLM(MODEL, dtype=name) for name in ("float32", "bfloat16")}
    prefill_only = SamplingParams(temperature=0, max_tokens=1)
    decode = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "total": []} for n in llms}
    for llm in llms.values():
        llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
    prompt_tokens = 0
    for _ in range(args.rounds):
        for name, llm in llms.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, prefill_only)
            times[name]["prefill"].append(time.perf_counter() - t0)
            prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
            t0 = time.perf_counter()
            llm.generate(prompts, decode)
            times[name]["total"].append(time.perf_counter() - t0)

    print(
        f"{MODEL}, batch {args.batch} ({prompt_tokens} prompt tokens), {args.tokens} output "
        f"tokens each, median of {args.rounds} alternating rounds; torch threads "
        f"{torch.get_num_threads()}"
    )
    speed = {}
    for name, t in times.items():
        prefill = statistics.median(t["prefill"])
        decode_s = max(statistics.median(t["total"]) - prefill, 1e-9)
        speed[name] = (prompt_tokens / prefill, args.batch * (args.tokens - 1) / decode_s)
        print(
            f"  {name:<9} prefill {speed[name][0]:7.0f} tok/s   decode {speed[name][1]:6.1f} tok/s"
            f"   (prefill {prefill:.2f} s, whole batch {statistics.median(t['total']):.2f} s)"
        )
    print(
        f"  bfloat16 / float32: prefill x{speed['bfloat16'][0] / speed['float32'][0]:.2f}, "
        f"decode x{speed['bfloat16'][1] / speed['float32'][1]:.2f}"
    )

    greedy = SamplingParams(temperature=0, max_tokens=48)
    answers = {name: llm.generate(prompts, greedy) for name, llm in llms.items()}
    same = agree = total = 0
    for a, b in zip(answers["float32"], answers["bfloat16"], strict=True):
        same += a.token_ids == b.token_ids
        prefix = 0
        for x, y in zip(a.token_ids, b.token_ids, strict=False):
            if x != y:
                break
            prefix += 1
        agree += prefix
        total += len(a.token_ids)
    print(
        f"  greedy answers identical: {same}/{len(prompts)}; tokens before the first "
        f"difference: {agree}/{total} ({agree / total:.0%})"
    )
    for a, b in list(zip(answers["float32"], answers["bfloat16"], strict=True))[:3]:
        print(f"    f32 : {a.text[:90]!r}\n    bf16: {b.text[:90]!r}")


if __name__ == "__main__":
    main()
