"""The coordinator's CPU per request without sockets, nodes or a load generator: the
core (``CoordinatorCore``) driven with the messages of short requests (16-token prompt,
2-token output) as the served system sees them, ``--in-flight`` at a time, decoding what
the coordinator receives and encoding what it sends included. Only the coordinator's
side is timed, and split by handler, so what a change to the core or the codec costs
per request shows without the machine's noise of a served run::

    python -m bench.coordinator_core [--requests 20480] [--in-flight 1024] [--freeze]

``--stream-steps N`` times the streamed-token path instead: ``--in-flight`` streamed
requests on one decode node, N decode steps of one token each (a ``StepTokens`` of the
whole batch, each token with its text), split into decoding the step, the core's
handling (index checks, charges, the connection's columns) and encoding the clients'
``tokens``, per token.

``--freeze`` does what the served coordinator does (``gc.freeze()`` of what the process
holds when it starts serving, here after importing what ``disagg serve`` imports).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from disagg.coordinator.core import CoordinatorCore, CoordinatorSettings, Outbox
from disagg.coordinator.core.outbox import client_batch, coalesced, node_batch
from disagg.coordinator.metrics import CoordinatorMetrics
from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.engine.worker import resolve_model_dir
from disagg.protocol import Generate, Sampling, decode_request, encode
from disagg.protocol.cluster import (
    Ending,
    Prefilled,
    PrefillResult,
    Pulled,
    PullRequest,
    Pushed,
    Register,
    StepTokens,
    decode_from_coordinator,
    decode_from_node,
    encode_node,
)

PROMPT = list(range(10, 26))


class Timed:
    """Seconds spent on the coordinator's side, by what it was doing."""

    def __init__(self) -> None:
        self.spent: Counter[str] = Counter()

    def __call__(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        self.spent[what] += time.perf_counter() - start
        return out


class Driver:
    """A coordinator core with one prefill node (p0) and one decode node (d0) registered,
    fed messages as the served system feeds it (each encoded, then decoded): what the
    coordinator's side spends is timed in ``timed``, by what it was doing."""

    def __init__(self) -> None:
        model_dir = resolve_model_dir("tiny")
        self.core = CoordinatorCore(
            ModelConfig.from_dir(model_dir),
            Tokenizer.from_dir(model_dir),
            CoordinatorSettings(),
            metrics=CoordinatorMetrics(),
        )
        self.timed, self.now = Timed(), 100.0
        for node_id, role in (("p0", "prefill"), ("d0", "decode")):
            self.from_node(node_id, Register(
                node_id=node_id, role=role, endpoint=f"{node_id}@0a", model="tiny",
                block_size=16, capacity_tokens=1 << 30, max_model_len=1 << 16,
                max_batch_tokens=1 << 30, pid=1,
            ))  # fmt: skip

    def sent(self, out: Outbox) -> list[Any]:
        """Encodes what the coordinator sends (timed); returns its node messages."""

        def encode_all() -> list[list[bytes]]:
            for _, msg in coalesced(out.client_sends(), client_batch):
                encode(msg)
            return [encode_node(msg) for _, msg in coalesced(out.nodes, node_batch)]

        msgs = []
        for frames in self.timed("encode replies and tasks", encode_all):
            msg = decode_from_coordinator(frames)  # (the node's side: not timed)
            msgs += msg.messages if msg.type == "batch" else [msg]
        return msgs

    def dispatch(self) -> list[Any]:
        return self.sent(self.timed("dispatch", self.core.dispatch, self.now))

    def from_node(self, node_id: str, msg: Any) -> list[Any]:
        decoded = self.timed(f"decode {msg.type}", decode_from_node, encode_node(msg))
        out = self.timed(
            f"on_node {msg.type}", self.core.on_node, node_id.encode(), decoded, self.now
        )
        return self.sent(out) + self.dispatch()

    def generate(self, k: int, sampling: Sampling, *, stream: bool = False) -> None:
        """Client ``c{k % 4}`` sends request ``r{k}`` (all through one connection)."""
        frames = encode(Generate(request_id=f"r{k}", client_id=f"c{k % 4}", prompt=PROMPT,
                                 sampling=sampling, stream=stream))  # fmt: skip
        msg = self.timed("decode generate", decode_request, frames)
        self.sent(self.timed("on_client generate", self.core.on_client, b"client", msg, self.now))

    def prefill_and_hand_off(self) -> list[int]:
        """Dispatches what waits, prefills it on p0 and moves its KV to d0: the rids now
        decoding on d0."""
        tasks = [m for m in self.dispatch() if m.type == "prefill_task"]
        results = [
            PrefillResult(rid=t.rid, first_token=5, text="a", prefill_start=0.0, prefill_s=0.01)
            for t in tasks
        ]
        work = self.from_node("p0", Prefilled(results=results))
        rids = [m.rid for m in work if m.type == "decode_task"]
        self.from_node("d0", PullRequest(rids=rids))
        self.from_node("p0", Pushed(rids=rids, dest="d0@0a"))
        self.from_node("d0", Pulled(rids=rids, source="p0@0a"))
        return rids


def run(requests: int, in_flight: int) -> tuple[Timed, int]:
    """``requests`` 2-token requests, ``in_flight`` at a time."""
    d = Driver()
    sampling = Sampling(max_tokens=2, temperature=0)
    done = 0
    while done < requests:
        for k in range(done, done + in_flight):
            d.generate(k, sampling)
        rids = d.prefill_and_hand_off()
        n = len(rids)
        d.from_node("d0", StepTokens(
            rids=rids, indices=[1] * n, tokens=[6] * n, texts=["b"] * n,
            finished=[Ending(rid=r, finish_reason="length") for r in rids], step_s=0.01,
        ))  # fmt: skip
        d.now += 0.05
        d.sent(d.timed("tick", d.core.tick, d.now))
        assert not d.core.requests, f"{len(d.core.requests)} requests left"
        done += in_flight
    return d.timed, done


def run_stream(in_flight: int, steps: int) -> tuple[Timed, int]:
    """``in_flight`` streamed requests decoded ``steps`` tokens each on one node; only
    the steps are timed."""
    d = Driver()
    sampling = Sampling(max_tokens=steps + 1, temperature=0)
    for k in range(in_flight):
        d.generate(k, sampling, stream=True)
    rids = d.prefill_and_hand_off()
    d.timed.spent.clear()
    n = len(rids)
    for i in range(1, steps + 1):
        ends = [Ending(rid=r, finish_reason="length") for r in rids] if i == steps else []
        d.from_node("d0", StepTokens(
            rids=rids, indices=[i] * n, tokens=[6 + i % 100] * n, texts=[" ab"] * n,
            finished=ends, step_s=0.01,
        ))  # fmt: skip
        d.now += 0.001
    assert not d.core.requests, f"{len(d.core.requests)} requests left"
    return d.timed, n * steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20480)
    p.add_argument("--in-flight", type=int, default=1024)
    p.add_argument("--freeze", action="store_true", help="gc.freeze() first, as served")
    p.add_argument("--stream-steps", type=int, metavar="N",
                   help="time streamed tokens: N decode steps of --in-flight requests")  # fmt: skip
    args = p.parse_args()
    import disagg.serve  # noqa: F401  (what a serving process holds)

    if args.freeze:
        gc.freeze()
    if args.stream_steps:
        run_stream(args.in_flight, min(args.stream_steps, 16))  # warm-up
        timed, tokens = run_stream(args.in_flight, args.stream_steps)
        total = sum(timed.spent.values())
        print(
            f"coordinator core + codec, {args.in_flight} streams x {args.stream_steps} "
            f"tokens{', gc frozen' if args.freeze else ''}: {total / tokens * 1e6:.2f} us "
            "per streamed token (the last step's endings included)"
        )
        for what, seconds in timed.spent.most_common():
            print(f"  {what:<28} {seconds / tokens * 1e6:7.2f} us")
        gc.unfreeze()
        return
    run(min(args.requests, args.in_flight), args.in_flight)  # warm-up
    timed, done = run(args.requests, args.in_flight)
    total = sum(timed.spent.values())
    print(
        f"coordinator core + codec, {done} requests, {args.in_flight} in flight"
        f"{', gc frozen' if args.freeze else ''}: {total / done * 1e6:.1f} us per request"
    )
    for what, seconds in timed.spent.most_common():
        print(f"  {what:<28} {seconds / done * 1e6:7.1f} us")
    gc.unfreeze()  # (frozen objects are not freed at exit: some bindings then complain)


if __name__ == "__main__":
    main()
