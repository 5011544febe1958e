"""The README's main job (offline for now): generate with a model and report speed."""

from __future__ import annotations

import random
import time

from disagg.engine.llm import LLM
from disagg.sampling_params import SamplingParams

TOPICS = [
    "the history of bread",
    "how tides work",
    "a quiet morning in the mountains",
    "why cats sleep so much",
    "building a wooden bookshelf",
    "the rules of chess",
    "a train journey across the plains",
    "learning to play the violin",
]


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"Tell me about {rng.choice(TOPICS)}." + " Please explain in detail." * rng.randint(0, 12)
        for _ in range(n)
    ]


def run_demo(*, model: str, device: str, dtype: str, num_prompts: int, max_tokens: int) -> int:
    t0 = time.perf_counter()
    llm = LLM(model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    prompts = demo_prompts(num_prompts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)

    llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0

    for out in outputs[:4]:
        print(f"prompt ({len(out.prompt_token_ids)} tokens): {out.prompt[:60]!r}")
        print(f"  -> {out.text[:100]!r}  [{out.finish_reason}]")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    print(
        f"\nmodel {model} on {device} ({dtype}), loaded in {load_s:.1f} s\n"
        f"{len(outputs)} requests: {prompt_tokens} prompt + {output_tokens} generated tokens "
        f"in {elapsed:.2f} s -> {output_tokens / elapsed:.1f} generated tokens/s, "
        f"{(prompt_tokens + output_tokens) / elapsed:.1f} total tokens/s"
    )
    return 0
