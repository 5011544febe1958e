"""What a request returns: the finished :class:`Completion` and the streamed chunks."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.protocol import Finished


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds, as measured by the coordinator; ``None`` where a phase did not happen."""

    queue: float | None
    ttft: float | None
    tpot: float | None
    kv_transfer: float | None
    total: float | None


@dataclass(frozen=True, slots=True)
class Nodes:
    """The prefill and decode nodes that served the request."""

    prefill: str | None
    decode: str | None


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    timings: Timings
    nodes: Nodes

    @classmethod
    def from_message(cls, msg: Finished) -> Completion:
        t = msg.timings
        return cls(
            request_id=msg.request_id,
            text=msg.text,
            token_ids=msg.token_ids,
            prompt_token_ids=msg.prompt_token_ids,
            finish_reason=msg.finish_reason,
            timings=Timings(t.queue_s, t.ttft_s, t.tpot_s, t.kv_transfer_s, t.total_s),
            nodes=Nodes(msg.nodes.prefill, msg.nodes.decode),
        )


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """Output tokens as they arrive: ``index`` is the position of ``token_ids[0]`` in the
    output, ``text`` the text they add."""

    index: int
    token_ids: list[int]
    text: str
