"""Who an HTTP request is from, and the coordinator connection it goes out on.

The gateway decides nothing about identity: it forwards the caller's bearer token as
the ``api_key`` of the ZeroMQ ``Generate`` and the claimed client (the body's ``user``,
else the ``X-Client-Id`` header, else one anonymous client) as its ``client_id``, and
the coordinator resolves them exactly as for a ZeroMQ client (``coordinator/auth.py``):
with a key file the key alone decides, and a missing or unknown key is refused
(``unauthorized``, answered 401); without one the claimed id is taken as sent.

``AsyncClient`` carries its API key per connection, so the gateway keeps one client per
distinct key (``ClientPool``): a handful in practice (one per tenant), bounded, and
idle ones are closed first when the bound is reached.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from starlette.requests import Request

from disagg.client import AsyncClient
from disagg.http.errors import APIError
from disagg.protocol.messages import MAX_API_KEY_CHARS

ANONYMOUS = "anonymous"
CLIENT_ID_HEADER = "x-client-id"


@dataclass(frozen=True, slots=True)
class Caller:
    api_key: str | None
    client_id: str
    named_by: str  # where client_id came from ("user", "X-Client-Id"), for error messages


def caller_of(request: Request, user: str | None) -> Caller:
    """The key and claimed client of ``request``; 401 for a malformed Authorization."""
    api_key = None
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401, "the Authorization header must be 'Bearer <API key>'", code="invalid_api_key"
            )
        if len(token) > MAX_API_KEY_CHARS:
            raise APIError(401, "unknown API key", code="invalid_api_key")
        api_key = token
    if user:
        return Caller(api_key, user, "user")
    header = request.headers.get(CLIENT_ID_HEADER)
    if header:
        return Caller(api_key, header, "X-Client-Id")
    return Caller(api_key, ANONYMOUS, "user")


class ClientPool:
    """One ``AsyncClient`` per API key, on one event loop. At most ``max_clients`` are
    kept; past that the least recently used idle client is closed (a busy one never is:
    closing would abort its requests)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float,
        server_key: str | None = None,
        max_clients: int = 256,
    ) -> None:
        self.address = address
        self._timeout = timeout
        self._server_key = server_key
        self._max = max_clients
        self._clients: OrderedDict[str | None, AsyncClient] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, api_key: str | None) -> AsyncClient:
        client = self._clients.get(api_key)
        if client is not None:
            self._clients.move_to_end(api_key)
            return client
        client = AsyncClient(
            self.address, timeout=self._timeout, api_key=api_key, server_key=self._server_key
        )
        self._clients[api_key] = client
        self._evict()
        return client

    def __len__(self) -> int:
        return len(self._clients)

    def _evict(self) -> None:
        newest = next(reversed(self._clients))  # the one just asked for stays
        for key in [k for k, c in self._clients.items() if c.in_flight == 0 and k != newest]:
            if len(self._clients) <= self._max:
                return
            task = asyncio.get_running_loop().create_task(self._clients.pop(key).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in clients), *self._closing)
