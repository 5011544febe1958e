"""Server-sent events for ``"stream": true``: one ``data:`` event per chunk of output,
the finishing chunk, the usage chunk when asked for, then ``data: [DONE]``.

Each chunk's JSON is the request's constant head and tail around the new text, written
with one ``json.dumps`` of the text: a chunk per output token is the gateway's hot path,
and a pydantic model per token would cost several times more (bench/http_overhead.py
measures the gateway's CPU per streamed token). The shapes are OpenAI's
``text_completion`` and ``chat.completion.chunk`` objects; the tests parse them with the
``openai`` package's own types.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from disagg.client import AsyncStream, StreamChunk
from disagg.errors import DisaggError
from disagg.http.errors import from_disagg
from disagg.http.schemas import Usage

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ChunkFormat:
    """How one request's chunks look: ``chat`` picks ``delta.content`` over ``text``;
    ``head`` is the JSON object's opening (id, object, created, model), built once."""

    id: str
    head: str
    chat: bool
    include_usage: bool

    @classmethod
    def of(cls, id: str, model: str, created: int, *, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps(
            {"id": id, "object": obj, "created": created, "model": model}, separators=(",", ":")
        )[:-1]
        return cls(id, head, chat, include_usage)

    def _choice(self, body: str, finish: str | None) -> bytes:
        usage = ',"usage":null' if self.include_usage else ""
        fin = "null" if finish is None else json.dumps(finish)
        return (
            f'data: {self.head},"choices":[{{"index":0,{body},"logprobs":null,'
            f'"finish_reason":{fin}}}]{usage}}}\n\n'
        ).encode()

    def text(self, delta: str) -> bytes:
        body = (
            f'"delta":{{"content":{json.dumps(delta)}}}'
            if self.chat
            else f'"text":{json.dumps(delta)}'
        )
        return self._choice(body, None)

    def role(self) -> bytes:
        return self._choice('"delta":{"role":"assistant","content":""}', None)

    def finish(self, reason: str) -> bytes:
        return self._choice('"delta":{}' if self.chat else '"text":""', reason)

    def usage(self, usage: Usage) -> bytes:
        return f'data: {self.head},"choices":[],"usage":{usage.model_dump_json()}}}\n\n'.encode()


def finish_reason(reason: str) -> str:
    # The coordinator's "abort" reaches no one: the gateway aborts only requests whose
    # caller has gone. Anything else but "length" is a stop (eos, stop string or token).
    return "length" if reason == "length" else "stop"


async def events(
    stream: AsyncStream,
    first: StreamChunk | None,
    fmt: ChunkFormat,
    *,
    rename: dict[str, str],
    on_tokens: Callable[[int], None],
) -> AsyncIterator[bytes]:
    """The event stream of a request whose first chunk (``None``: it finished without
    one) has arrived. Leaving early (the client disconnected, so this generator is
    cancelled or closed) aborts the request; an error after the first chunk is sent as
    an ``error`` event, since the status line has gone."""
    sent = 0  # characters of text streamed so far
    try:
        if fmt.chat:
            yield fmt.role()
        if first is not None:
            on_tokens(len(first.token_ids))
            if first.text:
                sent += len(first.text)
                yield fmt.text(first.text)
        async for chunk in stream:
            on_tokens(len(chunk.token_ids))
            if chunk.text:  # tokens whose text is still held back (a partial character)
                sent += len(chunk.text)
                yield fmt.text(chunk.text)
        done = stream.completion
        assert done is not None, "a stream that ended without an error has its completion"
        if len(done.text) > sent:  # the authoritative text ends with what was held back
            yield fmt.text(done.text[sent:])
        yield fmt.finish(finish_reason(done.finish_reason))
        if fmt.include_usage:
            yield fmt.usage(Usage.of(len(done.prompt_token_ids), len(done.token_ids)))
    except DisaggError as exc:
        log.warning("stream %s failed after its first chunk: %s", fmt.id, exc)
        yield f"data: {json.dumps(from_disagg(exc, rename).body())}\n\n".encode()
    finally:
        await stream.aclose()
    yield DONE
