"""Who may claim a client, and who may join as a node.

Fairness is per ``client_id``, so it is only as good as the check on who may claim one:

- ``ApiKeys`` — an API-key file maps each key to a client id, a weight and per-client
  limits; a request is served as the client its key maps to, whatever ``client_id`` it
  sends, and a missing or unknown key is rejected (``AuthenticationError``).
- ``OpenAccess`` — no key file (the local default): ``client_id`` is taken as sent.

Both answer ``resolve(api_key, claimed_client_id) -> ClientIdentity`` and
``describe() -> str``, so the coordinator calls one interface.

Nodes prove membership with the deployment's cluster secret
(``check_cluster_secret``); CurveZMQ (``disagg.protocol.curve``, shared with the client)
optionally encrypts both coordinator endpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from disagg.config_errors import config_error
from disagg.errors import AuthenticationError, ConfigError
from disagg.protocol.messages import MAX_API_KEY_CHARS, MAX_ID_CHARS

#: Shorter keys are guessable; the file is refused rather than served insecurely.
MIN_API_KEY_CHARS = 16


# -- who a request is served as ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Per-client limits; ``None`` means no limit of that kind."""

    max_in_flight_per_client: int | None = None
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    requests_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """The client a request is served as: the unit of fairness, its share (``weight``,
    as in ``FairnessConfig.weights``) and its limits."""

    client_id: str
    weight: float = 1.0
    limits: ClientLimits = field(default_factory=ClientLimits)


class ClientAccess(Protocol):
    """What the coordinator calls for every ``generate``."""

    def resolve(self, api_key: str | None, claimed_client_id: str) -> ClientIdentity:
        """The identity to serve the request as; raises ``AuthenticationError``."""
        ...

    def describe(self) -> str:
        """One line for the startup log."""
        ...


class OpenAccess:
    """No key file: every caller is the client it says it is. ``weights`` and
    ``limits`` (the same for every client) come from the deployment, if it sets them."""

    def __init__(
        self, weights: dict[str, float] | None = None, limits: ClientLimits | None = None
    ) -> None:
        self._weights = dict(weights or {})
        self._limits = limits or ClientLimits()

    def resolve(self, api_key: str | None, claimed_client_id: str) -> ClientIdentity:
        # A key sent to a server that checks none is ignored, not an error: a client
        # configured for a secured deployment still works against a local one.
        return ClientIdentity(
            claimed_client_id, self._weights.get(claimed_client_id, 1.0), self._limits
        )

    def describe(self) -> str:
        return "client ids are taken as sent: no API-key file configured"


class ApiKeys:
    """Clients known by API key. Keys are kept only as SHA-256 digests; a lookup hashes
    the offered key, so its time does not depend on how much of a real key it matches."""

    def __init__(self, by_digest: dict[bytes, ClientIdentity], source: str = "<memory>") -> None:
        self._by_digest = dict(by_digest)
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read a key file (YAML, or JSON when the name ends in ``.json``); raises
        ``ConfigError`` naming the bad field (``keys[2].weight``) or the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("api_key_file", f"cannot read {path}: {exc}") from exc
        return cls.parse(_parse_text(text, path), source=str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "<memory>") -> ApiKeys:
        """Build from already-parsed data of the key-file shape (see docs/operations.md)."""
        if not isinstance(data, dict):
            raise ConfigError(
                "api_key_file",
                f"{source} must be a mapping with a 'keys' list (see docs/operations.md)",
            )
        try:
            parsed = _KeyFile.model_validate(data)
        except ValidationError as exc:
            raise config_error(exc, source=source, model=_KeyFile) from None
        by_digest: dict[bytes, ClientIdentity] = {}
        key_at: dict[bytes, int] = {}
        client_at: dict[str, tuple[int, ClientIdentity]] = {}
        for i, entry in enumerate(parsed.keys):
            digest = entry.digest()
            if digest in key_at:
                raise ConfigError(
                    f"keys[{i}].{entry.key_field}",
                    f"same key as keys[{key_at[digest]}] (in {source})",
                )
            identity = entry.identity()
            first, other = client_at.setdefault(identity.client_id, (i, identity))
            # Several keys may name one client (key rotation), but the client has one
            # weight and one set of limits: the scheduler keeps one counter for it.
            if other != identity:
                raise ConfigError(
                    f"keys[{i}]",
                    f"client {identity.client_id!r} is also keys[{first}] with a different "
                    f"weight or limits (in {source})",
                )
            key_at[digest] = i
            by_digest[digest] = identity
        return cls(by_digest, source)

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def weights(self) -> dict[str, float]:
        """Client id → weight, for ``FairnessConfig.weights``."""
        return {ident.client_id: ident.weight for ident in self._by_digest.values()}

    def resolve(self, api_key: str | None, claimed_client_id: str) -> ClientIdentity:
        """The client ``api_key`` maps to; ``claimed_client_id`` is ignored (it is what
        the caller says, not who it is)."""
        if not api_key:
            raise AuthenticationError("this server requires an API key (api_key is missing)")
        identity = self._by_digest.get(hash_api_key(api_key))
        if identity is None:
            raise AuthenticationError("unknown API key")
        return identity

    def describe(self) -> str:
        n = len(self._by_digest)
        return f"{n} API key{'s' if n != 1 else ''} from {self.source}"


def hash_api_key(api_key: str) -> bytes:
    """The SHA-256 digest a key file's ``key_sha256`` holds (as hex)."""
    return hashlib.sha256(api_key.encode("utf-8")).digest()


def make_access(
    api_key_file: str | Path | None,
    weights: dict[str, float] | None = None,
    limits: ClientLimits | None = None,
) -> ApiKeys | OpenAccess:
    """``ApiKeys`` from the file, or ``OpenAccess`` when none is configured."""
    if api_key_file is None:
        return OpenAccess(weights, limits)
    return ApiKeys.load(api_key_file)


# -- the key file ----------------------------------------------------------------------

_PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class _Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_in_flight_per_client: _PositiveInt | None = None
    max_prompt_tokens: _PositiveInt | None = None
    max_tokens: _PositiveInt | None = None
    requests_per_minute: _PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        # The limit's old name: refused by name, so a file written for it does not
        # silently lose the limit (an unknown-field error would not say what to write).
        if isinstance(data, dict) and "max_queued_requests" in data:
            raise ConfigError(
                "max_queued_requests",
                "renamed to 'max_in_flight_per_client' (requests accepted and not yet ended)",
            )
        return data


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Exactly one of the two: the key itself, or its SHA-256 in hex, so the file need
    # not hold usable secrets.
    key: (
        Annotated[
            str, Field(strict=True, min_length=MIN_API_KEY_CHARS, max_length=MAX_API_KEY_CHARS)
        ]
        | None
    ) = None
    key_sha256: Annotated[str, Field(strict=True, pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    client_id: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_CHARS)]
    weight: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 1.0
    limits: _Limits | None = None  # an empty ``limits:`` in YAML is null: no limits

    @model_validator(mode="after")
    def _one_key(self) -> _Entry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        return self

    @property
    def key_field(self) -> str:
        return "key" if self.key is not None else "key_sha256"

    def digest(self) -> bytes:
        if self.key is not None:
            return hash_api_key(self.key)
        assert self.key_sha256 is not None
        return bytes.fromhex(self.key_sha256)

    def identity(self) -> ClientIdentity:
        limits = ClientLimits(**self.limits.model_dump()) if self.limits else ClientLimits()
        return ClientIdentity(self.client_id, float(self.weight), limits)


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: Annotated[list[_Entry], Field(min_length=1)]


def _parse_text(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("api_key_file", f"{path} is not valid JSON: {exc}") from exc
    import yaml  # imported here: only a coordinator with a key file needs it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("api_key_file", f"{path} is not valid YAML: {exc}") from exc


# -- nodes -----------------------------------------------------------------------------


def check_cluster_secret(expected: str | None, offered: str | None) -> bool:
    """Whether a node offering ``offered`` may join; ``expected is None`` means the
    deployment set no secret and every node may. Constant time in the secret's content."""
    if expected is None:
        return True
    if offered is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), offered.encode("utf-8"))
