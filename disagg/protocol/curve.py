"""CurveZMQ: encryption of the coordinator's two endpoints, for both ends of the wire
(the coordinator configures servers, clients and nodes configure clients), so a client
needs nothing of the coordinator's package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from disagg.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A CurveZMQ keypair on disk, as ``zmq.auth.create_certificates`` writes it:
    ``public_key_file`` (``NAME.key``) may be shared; ``secret_key_file``
    (``NAME.key_secret``) holds both keys and must stay private."""

    public_key_file: Path
    secret_key_file: Path


def generate_curve_keypair(directory: str | Path, name: str = "server") -> CurveKeys:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory`` (created if needed)."""
    _require_curve()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return CurveKeys(Path(public), Path(secret))


def configure_curve_server(socket: zmq.Socket[Any], secret_key_file: str | Path) -> None:
    """Make ``socket`` a CURVE server with the keypair in ``secret_key_file``; call before
    ``bind``. Peers without the server's public key cannot complete the handshake.
    (CURVE encrypts; *who* a client is remains the API key's job.)"""
    _require_curve()
    public, secret = _load_keypair(secret_key_file, need_secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def configure_curve_client(
    socket: zmq.Socket[Any],
    server_public_key_file: str | Path,
    client_secret_key_file: str | Path | None = None,
) -> None:
    """Make ``socket`` a CURVE client of the server whose public key is in
    ``server_public_key_file``; call before ``connect``. Without a client keypair file
    an ephemeral one is made."""
    _require_curve()
    server_public, _ = _load_keypair(server_public_key_file, need_secret=False)
    if client_secret_key_file is None:
        public, secret = zmq.curve_keypair()
    else:
        public, secret = _load_keypair(client_secret_key_file, need_secret=True)
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def _load_keypair(path: str | Path, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError("curve_key_file", f"cannot read CurveZMQ key {path}: {exc}") from exc
    if need_secret and secret is None:
        raise ConfigError(
            "curve_key_file", f"{path} holds no secret key (give the .key_secret file)"
        )
    return public, secret


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError("curve", "this libzmq was built without CURVE support")
