"""The endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health``, ``/metrics``. Each turns a body into one ``AsyncClient`` call and its
result into OpenAI's shape; checks that need the model (context length, tokeniser,
values in range) are the coordinator's, as for any ZeroMQ client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from disagg.client import AsyncStream, StreamChunk
from disagg.errors import DisaggError, InvalidRequestError
from disagg.http import schemas as s
from disagg.http.errors import APIError, from_disagg, from_validation
from disagg.http.identity import ClientPool, caller_of
from disagg.http.metrics import GatewayMetrics
from disagg.http.model import ServedModel
from disagg.http.streaming import ChunkFormat, events, finish_reason

# OpenAI's default for /v1/completions; chat defaults to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Chat's default when the context length is not known: the nodes stop at theirs.
UNKNOWN_CONTEXT = 2**31 - 1
# The coordinator refuses larger messages (protocol/codec.py); refuse them here as 413.
MAX_BODY_BYTES = 1 << 20
HEALTH_TIMEOUT_S = 2.0

Body = TypeVar("Body", bound=s.SampledRequest)
T = TypeVar("T")


class ClientGone(Exception):
    """The caller disconnected before its answer was ready."""


class Gateway:
    """What the endpoints share: the model, the coordinator connections, the metrics."""

    def __init__(self, model: ServedModel, pool: ClientPool, metrics: GatewayMetrics) -> None:
        self.model = model
        self.pool = pool
        self.metrics = metrics

    # -- endpoints -------------------------------------------------------------------

    def models(self) -> Response:
        return _json(s.ModelList(data=[self._card()]))

    def model_card(self, model_id: str) -> Response:
        self._check_model(model_id)
        return _json(self._card())

    def _card(self) -> s.ModelCard:
        m = self.model
        return s.ModelCard(id=m.name, created=m.created, max_model_len=m.max_context)

    def _check_model(self, name: str) -> None:
        if name != self.model.name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model.name!r}",
                param="model",
                code="model_not_found",
            )

    async def completions(self, request: Request) -> Response:
        req = await self._body(request, s.CompletionRequest)
        prompt = req.single_prompt()
        if prompt is None:
            raise APIError(
                400, "prompt: one prompt per request (a list of one is accepted)", param="prompt"
            )
        return await self._serve(request, req, prompt, chat=False, rename={})

    async def chat_completions(self, request: Request) -> Response:
        req = await self._body(request, s.ChatCompletionRequest)
        model = self.model
        if model.template is None or model.tokenizer is None:
            raise APIError(
                400,
                f"model {model.name!r} has no chat template, so chat messages cannot be "
                "rendered; send a prompt to /v1/completions instead",
                param="model",
                code="no_chat_template",
            )
        try:
            prompt = model.chat_prompt(req.messages)
        except InvalidRequestError as exc:
            raise from_disagg(exc) from None
        rename = {"prompt": "messages", "max_tokens": req.max_tokens_field}
        return await self._serve(request, req, prompt, chat=True, rename=rename)

    async def health(self) -> Response:
        try:
            await self.pool.get(None).ping(timeout=HEALTH_TIMEOUT_S)
        except DisaggError as exc:
            raise APIError(503, f"the coordinator does not answer: {exc}") from None
        return Response(b'{"status":"ok"}', media_type="application/json")

    def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # -- one request -----------------------------------------------------------------

    async def _body(self, request: Request, model: type[Body]) -> Body:
        raw = await _read_body(request)
        try:
            body = model.model_validate_json(raw)
        except ValidationError as exc:
            raise from_validation(exc) from None
        if body.model is not None:
            self._check_model(body.model)
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad[0]}: {bad[1]}", param=bad[0], code="unsupported")
        return body

    async def _serve(
        self,
        request: Request,
        req: s.CompletionRequest | s.ChatCompletionRequest,
        prompt: str | list[int],
        *,
        chat: bool,
        rename: dict[str, str],
    ) -> Response:
        caller = caller_of(request, req.user)
        rename = {**rename, "client_id": caller.named_by}
        client = self.pool.get(caller.api_key)
        default = COMPLETIONS_DEFAULT_MAX_TOKENS
        if chat:  # the rest of the context by default, as OpenAI and vLLM do
            context = self.model.max_context or UNKNOWN_CONTEXT
            default = max(1, context - len(prompt))
        sampling = req.sampling(default)
        created = int(time.time())
        try:
            if req.stream:
                stream = client.stream(prompt, client_id=caller.client_id, **sampling)
                return await self._stream(request, stream, req, created, chat, rename)
            done = await _until_disconnected(
                request, client.generate(prompt, client_id=caller.client_id, **sampling)
            )
        except DisaggError as exc:
            raise from_disagg(exc, rename) from None
        except ClientGone:
            return Response(status_code=499)
        usage = s.Usage.of(len(done.prompt_token_ids), len(done.token_ids))
        reason = finish_reason(done.finish_reason)
        if chat:
            return _json(
                s.ChatCompletion(
                    id=f"chatcmpl-{done.request_id}",
                    created=created,
                    model=self.model.name,
                    choices=[
                        s.ChatChoice(message=s.ChatMessage(content=done.text), finish_reason=reason)
                    ],
                    usage=usage,
                )
            )
        return _json(
            s.Completion(
                id=f"cmpl-{done.request_id}",
                created=created,
                model=self.model.name,
                choices=[s.CompletionChoice(text=done.text, finish_reason=reason)],
                usage=usage,
            )
        )

    async def _stream(
        self,
        request: Request,
        stream: AsyncStream,
        req: s.CompletionRequest | s.ChatCompletionRequest,
        created: int,
        chat: bool,
        rename: dict[str, str],
    ) -> Response:
        # The status line waits for the first chunk, so a refusal (bad value, limits,
        # no node) is an HTTP status, not an event inside a 200.
        start = time.perf_counter()
        try:
            first: StreamChunk | None = await _until_disconnected(request, _first(stream))
        except BaseException:
            await stream.aclose()
            raise
        self.metrics.first_chunk.observe(time.perf_counter() - start)
        prefix = "chatcmpl" if chat else "cmpl"
        fmt = ChunkFormat.of(
            f"{prefix}-{stream.request_id}",
            self.model.name,
            created,
            chat=chat,
            include_usage=req.include_usage,
        )
        body = events(stream, first, fmt, rename=rename, on_tokens=self.metrics.tokens.inc)
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past ``MAX_BODY_BYTES`` before more is read."""
    too_big = APIError(413, f"the body is over {MAX_BODY_BYTES} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_big
        parts.append(part)
    return b"".join(parts)


async def _first(stream: AsyncStream) -> StreamChunk | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:  # finished before any output chunk (e.g. at once by a stop)
        return None


async def _until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Runs ``work`` until it ends or the caller disconnects; then it is cancelled (the
    client library aborts the request at the coordinator) and ``ClientGone`` raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait((task,))
    raise ClientGone


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")
