"""The ASGI application: the routes of ``routes.py`` on FastAPI, errors in OpenAI's
shape, and the gateway's metrics measured around every request.

The gateway holds no request state of its own beyond the connections it relays: each
request is one ``AsyncClient`` call to the coordinator, so any number of gateways can
run behind one coordinator (``disagg http --coordinator ...``) and identity, fairness
and limits stay the coordinator's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from disagg.http.errors import APIError
from disagg.http.identity import ClientPool
from disagg.http.metrics import GatewayMetrics
from disagg.http.model import ServedModel
from disagg.http.routes import Gateway

log = logging.getLogger(__name__)

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass(frozen=True)
class GatewaySettings:
    coordinator: str  # the coordinator's client address, tcp://host:port
    model: str  # what the nodes were given as --model ('tiny', a directory, ...)
    served_model_name: str | None = None  # the id clients send as "model" (default: model)
    request_timeout: float = 600.0  # seconds per request (streams: per chunk)
    server_key: str | None = None  # the coordinator's CurveZMQ public key file
    max_clients: int = 256  # coordinator connections kept (one per API key)


def create_app(settings: GatewaySettings, model: ServedModel | None = None) -> FastAPI:
    """The gateway as an ASGI app; its connections open in the app's lifespan."""
    served = model or ServedModel.load(settings.model, settings.served_model_name)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = ClientPool(
            settings.coordinator,
            timeout=settings.request_timeout,
            server_key=settings.server_key,
            max_clients=settings.max_clients,
        )
        app.state.gateway = Gateway(served, pool, metrics)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(
        title="disagg OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None
    )

    def gateway(request: Request) -> Gateway:
        return request.app.state.gateway

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return gateway(request).models()

    @app.get("/v1/models/{model_id:path}")
    async def model_card(request: Request, model_id: str) -> Response:
        return gateway(request).model_card(model_id)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway(request).completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway(request).chat_completions(request)

    @app.get("/health")
    async def health(request: Request) -> Response:
        return await gateway(request).health()

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        return gateway(request).metrics_text()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:  # 404, 405
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    app.add_middleware(_Measure, metrics=metrics)
    return app


class _Measure:
    """Counts every answer by route and status and times it to its last byte (a plain
    ASGI middleware: Starlette's BaseHTTPMiddleware would buffer streams)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = (
            path
            if path in ROUTES
            else "/v1/models/*"
            if path.startswith("/v1/models/")
            else "other"
        )
        status = 499  # nothing was sent: the caller went away first
        start = time.perf_counter()

        async def measured_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.open.inc()
        try:
            await self.app(scope, receive, measured_send)
        finally:
            self.metrics.open.dec()
            self.metrics.answered(route, status, time.perf_counter() - start)
