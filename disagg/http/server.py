"""Running a gateway: ``disagg http`` / ``python -m disagg.http`` (alone, against a
coordinator's address), or as the child process ``disagg serve --http-port`` starts.

uvicorn on uvloop with the httptools parser, as vLLM and SGLang serve. The listening
socket is either bound here (``--host``/``--port``) or inherited (``--fd``): the parent
binds it, so port 0 works and the port is known before the child starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # FastAPI is imported when a gateway starts, not by every `disagg` command
    from disagg.http.app import GatewaySettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator", default="tcp://127.0.0.1:5555", help="the coordinator's client address"
    )
    p.add_argument("--model", default="tiny", help="the served model, as given to disagg serve")
    p.add_argument("--served-model-name", default=None, help="the id clients send as 'model'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)  # inherited socket
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--server-key", default=None, help="the coordinator's CurveZMQ public key")


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    from disagg.http.app import GatewaySettings

    return GatewaySettings(
        coordinator=args.coordinator,
        model=args.model,
        served_model_name=args.served_model_name,
        request_timeout=args.request_timeout,
        server_key=args.server_key,
    )


def run_gateway(
    settings: GatewaySettings, *, host: str = "127.0.0.1", port: int = 8000, fd: int | None = None
) -> int:
    """Serves until SIGINT/SIGTERM (uvicorn's graceful shutdown: open requests finish)."""
    import uvicorn

    from disagg.http.app import create_app

    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", "WARNING"))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=os.environ.get("DISAGG_LOG_LEVEL", "warning").lower(),
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    sockets = [socket.socket(fileno=fd)] if fd is not None else None
    if sockets is None:
        print(
            f"disagg http: serving http://{host}:{port}/v1 for {settings.coordinator}", flush=True
        )
    server.run(sockets=sockets)
    return 0


def run_http_command(args: argparse.Namespace) -> int:
    return run_gateway(settings_from(args), host=args.host, port=args.port, fd=args.fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disagg.http", description=__doc__)
    add_arguments(p)
    return run_http_command(p.parse_args(argv))
