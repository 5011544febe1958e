"""The typed messages between clients and the coordinator's client endpoint.

One pydantic model per message type; the ``type`` field tells them apart on the wire.
Every model forbids unknown fields and non-finite numbers, so what decodes is exactly
what ``docs/protocol.md`` describes. The models check types and shapes only: whether a
request's values make sense (a temperature below zero, a prompt too long for the model)
is the coordinator's question, answered with ``Error{code: "invalid_request"}``.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainValidator,
    ValidationInfo,
    field_validator,
)
from pydantic_core import CoreSchema, core_schema

from disagg.sampling_params import SamplingParams

# Bounds on identifiers keep a hostile peer from making the coordinator index huge keys.
MAX_ID_CHARS = 256
MAX_API_KEY_CHARS = 4096

ErrorCode = Literal["invalid_request", "rejected", "unavailable", "failed", "bad_message"]
FinishReason = Literal["stop", "length", "abort"]

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
TokenId = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]


def _check_prompt(value: Any) -> str | list[int]:
    # A plain validator instead of ``str | list[int]``: pydantic would report a failed union
    # once per member, under member names no client knows; this names the field alone.
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for i, t in enumerate(value):
            if type(t) is not int or t < 0:
                raise ValueError(f"token id at position {i} must be an integer >= 0, got {t!r}")
        return value
    raise ValueError(
        f"must be a string or a list of token ids, got {type(value).__name__} {value!r:.40}"
    )


Prompt = Annotated[str | list[int], PlainValidator(_check_prompt)]


_M = TypeVar("_M", bound=BaseModel)
_setattr = object.__setattr__


def made_here(cls: type[_M], **values: Any) -> _M:
    """What ``cls.model_construct(**values)`` builds (no validation), at about half the
    cost of ``cls(**values)``, where pydantic's own ``model_construct`` costs more than
    validating. Only for messages whose every value the coordinator made or already
    validated as the same type: never straight from what a client or node sent. Every
    field without a plain default must be given."""
    m = cls.__new__(cls)
    fields = _template(cls).copy()
    fields.update(values)  # (keys keep the template's order: the fields')
    _setattr(m, "__dict__", fields)
    _setattr(m, "__pydantic_fields_set__", set(values))
    _setattr(m, "__pydantic_extra__", None)
    _setattr(m, "__pydantic_private__", None)
    return m


@cache
def _template(cls: type[BaseModel]) -> dict[str, Any]:
    """Each field of ``cls`` in order, with its plain default (None where it has none)."""
    return {
        name: None if f.is_required() or f.default_factory is not None else f.default
        for name, f in cls.model_fields.items()
    }


class SerializedAsItself:
    """Serialize a discriminated union of models with each value's own serializer;
    validation is untouched. pydantic-core serializes a union member to Python objects
    first and then those to JSON, which doubles the cost of every message in a batch."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        schema = handler(source)
        schema["serialization"] = core_schema.simple_ser_schema("any")
        return schema


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Sampling(_Message):
    """:class:`~disagg.sampling_params.SamplingParams` on the wire. Every field may be
    omitted (the default applies); ranges are checked by :meth:`to_params`."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    @classmethod
    def from_params(cls, params: SamplingParams) -> Sampling:
        return cls(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=list(params.stop),
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
        )

    def to_params(self) -> SamplingParams:
        """Raises :class:`~disagg.errors.InvalidRequestError` naming the bad field.
        Equal settings give the same params (immutable), checked once: most requests
        share a few settings, and the checks cost more than the lookup."""
        stop, stop_token_ids = tuple(self.stop), tuple(self.stop_token_ids)
        # (pydantic made each field its type: a key never mixes 1 and True or 1.0)
        key = (self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed,
               stop, stop_token_ids, self.ignore_eos)  # fmt: skip
        params = _PARAMS.get(key)
        if params is None:
            params = SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self.seed,
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=self.ignore_eos,
            )
            if len(_PARAMS) >= _MAX_PARAMS:  # (distinct seeds would grow it without end)
                _PARAMS.clear()
            _PARAMS[key] = params
        return params


# Sampling.to_params's checked params, by settings (only valid ones are kept).
_PARAMS: dict[tuple[Any, ...], SamplingParams] = {}
_MAX_PARAMS = 4096


# -- client -> coordinator -------------------------------------------------------------


class Generate(_Message):
    """Start a request. ``request_id`` is chosen by the client, unique per connection."""

    type: Literal["generate"] = "generate"
    request_id: Id
    client_id: Id
    api_key: Annotated[str, Field(max_length=MAX_API_KEY_CHARS)] | None = None
    prompt: Prompt
    sampling: Sampling = Field(default_factory=Sampling)
    stream: bool = False


class Abort(_Message):
    """Stop a request; the coordinator frees its resources and sends nothing more for it
    (or one ``Finished`` with ``finish_reason == "abort"`` that the client ignores)."""

    type: Literal["abort"] = "abort"
    request_id: Id


class Ping(_Message):
    type: Literal["ping"] = "ping"
    nonce: Id


# -- coordinator -> client -------------------------------------------------------------


class Accepted(_Message):
    """The request is valid and queued; sent once, before any ``Tokens``."""

    type: Literal["accepted"] = "accepted"
    request_id: Id
    prompt_token_ids: list[TokenId]


class Tokens(_Message):
    """Streamed output (streamed requests only) of one or more requests of this
    connection, as columns with one entry per token: output token ``indices[i]`` of
    request ``request_ids[i]`` is ``token_ids[i]``, and ``texts[i]`` is the text it adds
    (``""`` while a character is unfinished). Per request, entries arrive in order,
    across messages too, without gaps or repeats. Columns, not one object per token:
    the cost of a message is per message, not per token, at both ends."""

    type: Literal["tokens"] = "tokens"
    request_ids: list[Id]
    indices: list[Annotated[int, Field(ge=0)]]
    token_ids: list[TokenId]
    texts: list[str]

    @field_validator("indices", "token_ids", "texts")
    @classmethod
    def _one_per_request_id(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        ids = info.data.get("request_ids")
        if ids is not None and len(value) != len(ids):
            raise ValueError(f"has {len(value)} entries where request_ids has {len(ids)}")
        return value


class Timings(_Message):
    """Seconds spent by the request; ``null`` where a phase did not happen (``tpot_s``
    with fewer than two output tokens; ``kv_transfer_s`` when it finished at prefill)."""

    queue_s: Seconds | None = None
    ttft_s: Seconds | None = None
    tpot_s: Seconds | None = None
    kv_transfer_s: Seconds | None = None
    total_s: Seconds | None = None


class Nodes(_Message):
    """Which prefill and decode nodes served the request (the last ones, after a retry)."""

    prefill: str | None = None
    decode: str | None = None


class Finished(_Message):
    """The request is done; the full output, authoritative over the streamed chunks."""

    type: Literal["finished"] = "finished"
    request_id: Id
    finish_reason: FinishReason
    token_ids: list[TokenId]
    text: str
    prompt_token_ids: list[TokenId]
    timings: Timings = Field(default_factory=Timings)
    nodes: Nodes = Field(default_factory=Nodes)


class Error(_Message):
    """The request (or, with ``request_id == null``, a message that could not be tied to
    one) failed. ``field``/``reason`` refine ``code``: the field at fault for
    ``invalid_request`` and ``bad_message``; the machine-readable reason for
    ``rejected`` (``rate_limit``, ...) and ``bad_message`` (the protocol error code)."""

    type: Literal["error"] = "error"
    request_id: Id | None = None
    code: ErrorCode
    field: str | None = None
    reason: str | None = None
    message: str


class Pong(_Message):
    type: Literal["pong"] = "pong"
    nonce: Id


class Batch(_Message):
    """Several replies to one connection that the coordinator decided at once (one
    decode step's tokens, a burst of acceptances and completions): one message where
    version 1 sent one each. Each element means exactly what it would alone; they are
    read in order."""

    type: Literal["batch"] = "batch"
    messages: list[
        Annotated[
            Accepted | Tokens | Finished | Error | Pong,
            Field(discriminator="type"),
            SerializedAsItself(),
        ]
    ]


ClientMessage = Generate | Abort | Ping
ServerMessage = Accepted | Tokens | Finished | Error | Pong | Batch
Message = ClientMessage | ServerMessage
