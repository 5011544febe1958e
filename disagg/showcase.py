"""The README's main job: the served system, one heavy client and two light ones asking
real questions, first under FCFS and then under two-stage VTC, with a table of what
each client got (service, TTFT, TPOT, SLO attainment) and a sample answer per client.

The model is SmolLM2-135M-Instruct by default (questions rendered with its chat
template; answers end at its end-of-turn token), or ``tiny`` (random weights: the text
is noise, so every answer runs to ``max_tokens``). The decode node is given few slots
(``--decode-slots``) so that, on a laptop, demand exceeds what the cluster serves:
fairness only matters under contention.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from disagg.client import AsyncClient
from disagg.engine.chat_template import ChatTemplate, load_chat_template
from disagg.serve import ServedCluster, ServeOptions

W_IN, W_OUT = 1, 2  # the default service cost h = n_in + 2 n_out
DEFAULT_MODEL = "smollm2-135m-instruct"

HEAVY_QUESTIONS = (
    "Explain in detail how a steam engine works, step by step.",
    "Describe the water cycle in detail, with every stage and what drives it.",
    "Explain how the internet routes a message from one computer to another.",
    "Describe in detail how bread is made, from flour to loaf.",
)
LIGHT_QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "What is the largest planet in the solar system?",
)


@dataclass(frozen=True)
class ClientSpec:
    name: str
    in_flight: int
    questions: tuple[str, ...]
    max_tokens: int


CLIENTS = (
    ClientSpec("heavy", in_flight=8, questions=HEAVY_QUESTIONS, max_tokens=48),
    ClientSpec("light-1", in_flight=1, questions=LIGHT_QUESTIONS, max_tokens=16),
    ClientSpec("light-2", in_flight=1, questions=LIGHT_QUESTIONS[::-1], max_tokens=16),
)


@dataclass
class ClientResult:
    service: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    met: int = 0
    requests: int = 0
    sample: tuple[str, str] | None = None  # (question, answer) of the first completion


@dataclass(frozen=True)
class Prompter:
    """Questions -> prompts: chat-templated for a chat model; as they are for the tiny
    model, whose random weights make EOS meaningless (so answers run to max_tokens)."""

    template: ChatTemplate | None

    def prompt(self, question: str) -> str:
        if self.template is None:
            return question
        return self.template.render([{"role": "user", "content": question}])

    @property
    def ignore_eos(self) -> bool:
        return self.template is None


def demo_dtype(model: str, dtype: str, device: str = "cpu") -> str:
    """``auto`` -> bfloat16 for a trained model on a CPU with native bfloat16 (AVX512-BF16
    or AMX): bench/smollm2_dtype.py measured SmolLM2's decoding 1.44x faster there, with
    prefill 0.66x (docs/results/smollm2-dtype.md). The tiny model stays in float32."""
    if dtype != "auto" or device != "cpu" or model == "tiny":
        return dtype
    return "bfloat16" if cpu_has_bfloat16() else "auto"


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively on this CPU."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


async def drive(
    address: str, prompter: Prompter, duration: float, ttft_slo: float, tpot_slo: float
) -> dict[str, ClientResult]:
    results = {c.name: ClientResult() for c in CLIENTS}

    async def worker(client: AsyncClient, spec: ClientSpec, stop_at: float, k: int) -> None:
        n = k
        while time.monotonic() < stop_at:
            question = spec.questions[n % len(spec.questions)]
            n += spec.in_flight
            done = await client.generate(
                prompter.prompt(question),
                client_id=spec.name,
                max_tokens=spec.max_tokens,
                ignore_eos=prompter.ignore_eos,
                temperature=0.0,
            )
            if time.monotonic() > stop_at:
                break
            r = results[spec.name]
            t = done.timings
            r.requests += 1
            r.service += W_IN * len(done.prompt_token_ids) + W_OUT * len(done.token_ids)
            r.ttft.append(t.ttft or 0.0)
            if t.tpot is not None:
                r.tpot.append(t.tpot)
            r.met += (t.ttft or 0.0) <= ttft_slo and (t.tpot or 0.0) <= tpot_slo
            if r.sample is None:
                r.sample = (question, done.text)

    async with AsyncClient(address, timeout=300) as client:
        stop_at = time.monotonic() + duration
        await asyncio.gather(
            *(worker(client, spec, stop_at, k) for spec in CLIENTS for k in range(spec.in_flight))
        )
    return results


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def print_table(policy: str, results: dict[str, ClientResult], duration: float) -> None:
    total = sum(r.service for r in results.values()) or 1
    print(f"\n{policy}")
    print(
        f"  {'client':<9}{'in flight':>10}{'requests':>10}{'service/s':>11}{'share':>8}"
        f"{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}{'SLO met':>9}"
    )
    for spec in CLIENTS:
        r = results[spec.name]
        attain = r.met / r.requests if r.requests else float("nan")
        print(
            f"  {spec.name:<9}{spec.in_flight:>10}{r.requests:>10}{r.service / duration:>11.0f}"
            f"{r.service / total:>8.1%}{_p(r.ttft, 50) * 1e3:>8.0f}ms{_p(r.ttft, 90) * 1e3:>8.0f}ms"
            f"{_p(r.tpot, 50) * 1e3:>8.1f}ms{attain:>9.0%}"
        )
    for spec in CLIENTS:
        sample = results[spec.name].sample
        if sample is not None:
            answer = " ".join(sample[1].split())
            answer = answer if len(answer) <= 110 else answer[:107] + "..."
            print(f"  {spec.name} asked {sample[0]!r}\n    -> {answer!r}")


async def unloaded_latency(address: str, prompter: Prompter) -> tuple[float, float]:
    """Median TTFT and TPOT of a light request alone: the SLOs are set from these, so the
    demo means the same on a slow laptop and a fast server."""
    spec = CLIENTS[1]
    ttfts, tpots = [], []
    async with AsyncClient(address, timeout=120) as client:
        for k in range(3):
            done = await client.generate(
                prompter.prompt(spec.questions[k % len(spec.questions)]),
                client_id="calibration",
                max_tokens=spec.max_tokens,
                ignore_eos=True,
                temperature=0.0,
            )
            ttfts.append(done.timings.ttft or 0.0)
            tpots.append(done.timings.tpot or 0.0)
    return statistics.median(ttfts), statistics.median(tpots)


def run_showcase(
    *,
    model: str = DEFAULT_MODEL,
    dtype: str = "auto",
    duration: float = 30.0,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    decode_slots: int = 2,
    policies: tuple[str, ...] = ("fcfs", "two-stage-vtc"),
) -> int:
    """SLOs default to 5x the unloaded TTFT (at least 50 ms) and 6x the unloaded TPOT,
    measured on the first policy's cluster before its load starts."""
    dtype = demo_dtype(model, dtype)
    prompter = Prompter(load_chat_template(model))
    print(
        f"disagg: 1 prefill + 1 decode node serving {model!r} ({dtype}); clients: "
        + ", ".join(f"{c.name} ({c.in_flight} in flight)" for c in CLIENTS)
        + f"; {duration:.0f} s per policy; service counts prompt tokens once and output "
        "tokens twice"
    )
    started = time.monotonic()
    for policy in policies:
        options = ServeOptions(
            model=model,
            dtype=dtype,
            port=0,
            policy=policy,
            max_num_seqs=decode_slots,
            num_blocks=512,
        )
        with ServedCluster(options) as cluster:
            if ttft_slo is None or tpot_slo is None:
                ttft0, tpot0 = asyncio.run(unloaded_latency(cluster.client_address, prompter))
                ttft_slo = ttft_slo or round(max(0.05, 5 * ttft0), 3)
                tpot_slo = tpot_slo or round(6 * tpot0, 4)
                print(
                    f"disagg: unloaded light request: TTFT {ttft0 * 1e3:.1f} ms, TPOT "
                    f"{tpot0 * 1e3:.1f} ms -> SLO: TTFT <= {ttft_slo * 1e3:.0f} ms and "
                    f"TPOT <= {tpot_slo * 1e3:.1f} ms"
                )
            results = asyncio.run(
                drive(cluster.client_address, prompter, duration, ttft_slo, tpot_slo)
            )
        print_table(policy, results, duration)
    print(
        "\nUnder FCFS the heavy client's queue delays everyone behind it. Under two-stage VTC "
        "a backlogged client with less service goes first, so the light clients (their share "
        "limited only by their own demand) get more service and faster tokens."
        f"\n(whole run: {time.monotonic() - started:.0f} s)"
    )
    return 0
