"""Driving the coordinator's core directly: no sockets, no threads, a clock the test
moves. ``CoreHarness`` keeps what the core sent, per peer, for the test to read."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from disagg.coordinator.core import CoordinatorCore, CoordinatorSettings, Outbox
from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.engine.worker import resolve_model_dir
from disagg.protocol import Generate, Sampling
from disagg.protocol.cluster import (
    Ending,
    Prefilled,
    PrefillResult,
    Register,
    StepTokens,
)

CLIENT = b"client-0"


class CoreHarness:
    def __init__(self, metrics: Any = None, **settings: Any):
        model_dir = resolve_model_dir("tiny")
        self.now = 100.0
        self.core = CoordinatorCore(
            ModelConfig.from_dir(model_dir),
            Tokenizer.from_dir(model_dir),
            CoordinatorSettings(**settings),
            metrics=metrics,
            now=self.now,
        )
        self.to_client: dict[bytes, list[Any]] = defaultdict(list)
        self.to_node: dict[bytes, list[Any]] = defaultdict(list)

    def _keep(self, out: Outbox) -> None:
        for identity, msg in out.client_sends():
            self.to_client[identity].append(msg)
        for identity, msg in out.nodes:
            self.to_node[identity].append(msg)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    # -- acting as the shell would --------------------------------------------------------

    def client(self, msg: Any, identity: bytes = CLIENT) -> None:
        self._keep(self.core.on_client(identity, msg, self.now))
        self._keep(self.core.dispatch(self.now))

    def node(self, node_id: str, msg: Any) -> None:
        self._keep(self.core.on_node(node_id.encode(), msg, self.now))
        self._keep(self.core.dispatch(self.now))

    def tick(self) -> None:
        self._keep(self.core.tick(self.now))

    def register(self, node_id: str, role: str, **fields: Any) -> Any:
        msg = dict(
            node_id=node_id, role=role, endpoint=f"{node_id}@0a", model="tiny-test",
            block_size=16, capacity_tokens=4096, max_model_len=1024, max_batch_tokens=4096,
            pid=1,
        )  # fmt: skip
        msg.update(fields)
        self.node(node_id, Register(**msg))
        # The answer (Welcome or Refused); anything else sent to it stays to be read.
        sent = self.to_node[node_id.encode()]
        answer = next(m for m in sent if m.type in ("welcome", "refused"))
        sent.remove(answer)
        return answer

    def generate(self, request_id: str = "r1", *, identity: bytes = CLIENT, **kw: Any) -> None:
        stream = kw.pop("stream", False)
        prompt = kw.pop("prompt", "hello")
        self.client(
            Generate(
                request_id=request_id,
                client_id=kw.pop("client_id", "alice"),
                prompt=prompt,
                sampling=Sampling(**kw),
                stream=stream,
            ),
            identity,
        )

    # -- reading what was sent ------------------------------------------------------------

    def take_node(self, node_id: str, skip: tuple[str, ...] = ("counters",)) -> list[Any]:
        msgs = [m for m in self.to_node.pop(node_id.encode(), []) if m.type not in skip]
        return msgs

    def take_client(self, identity: bytes = CLIENT) -> list[Any]:
        return self.to_client.pop(identity, [])


def prefilled(rid: int, first_token: int, finish_reason: str | None = None) -> Prefilled:
    """The prefill node's report of ``rid`` prefilled (its text: ``<first_token>``)."""
    return Prefilled(
        results=[
            PrefillResult(
                rid=rid,
                first_token=first_token,
                finish_reason=finish_reason,  # type: ignore[arg-type]
                text=f"<{first_token}>",
                prefill_start=0.0,
                prefill_s=0.001,
            )
        ]
    )


def step(
    rid: int,
    index: int,
    tokens: list[int],
    finish_reason: str | None = None,
    texts: list[str] | None = None,
) -> StepTokens:
    """A decode node's report of ``rid``'s ``tokens`` from output position ``index`` on."""
    ending = [Ending(rid=rid, finish_reason=finish_reason)] if finish_reason else []  # type: ignore[arg-type]
    return StepTokens(
        rids=[rid] * len(tokens),
        indices=list(range(index, index + len(tokens))),
        tokens=tokens,
        texts=texts if texts is not None else [f"<{t}>" for t in tokens],
        finished=ending,
    )


def last_token(rid: int, token: int) -> StepTokens:
    """A decode step that produces ``rid``'s second and last token."""
    return step(rid, 1, [token], "length")


def streamed(replies: list[Any]) -> list[tuple[str, int, int, str]]:
    """The streamed tokens among ``replies``, in order: (request id, index, token, text)."""
    return [
        entry
        for m in replies
        if m.type == "tokens"
        for entry in zip(m.request_ids, m.indices, m.token_ids, m.texts, strict=True)
    ]
