"""OpenAI's request and response bodies, as pydantic models (docs/openai-api.md).

Requests: fields we serve are typed and range-checked here, so a bad one is a 400 naming
it; fields of OpenAI's API that we do not serve are accepted only at their no-op value
(``n`` = 1, ``logprobs`` off, penalties 0, ...) and refused by name otherwise; anything
else is ignored, as vLLM does, so clients written for other servers keep working.
Responses are built once per request (the streamed chunks are in ``streaming.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
)

# OpenAI's own bound on a seed is a 64-bit integer; SamplingParams checks the exact range.
MaxTokens = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
Stop = str | list[str] | None


def _check_prompt(value: Any) -> str | list[int] | list[str] | list[list[int]]:
    # One message naming the forms, instead of pydantic's one line per union member.
    def ids(v: Any) -> bool:
        return isinstance(v, list) and all(type(t) is int for t in v)

    if isinstance(value, str) or ids(value):
        return value
    if isinstance(value, list) and (
        all(isinstance(p, str) for p in value) or all(ids(p) for p in value)
    ):
        return value
    raise ValueError(
        "must be a string, a list of token ids, or a list of one of either; "
        f"got {type(value).__name__} {value!r:.40}"
    )


Prompt = Annotated[str | list[int] | list[str] | list[list[int]], PlainValidator(_check_prompt)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SampledRequest(_Body):
    """What both endpoints share."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Annotated[StrictFloat, Field(ge=0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = None
    stop: Stop = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, which benchmark clients send (e.g. ignore_eos for fixed lengths).
    top_k: StrictInt | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    # OpenAI fields we do not serve: allowed only at the value that changes nothing.
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: StrictInt | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something we cannot serve."""
        if self.n != 1:
            return "n", f"only n = 1 is supported, got {self.n}"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name, "penalties are not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of = 1 is supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "is only allowed when stream is true"
        return None

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of ``AsyncClient.generate`` / ``stream`` (SamplingParams)."""
        out: dict[str, Any] = {"max_tokens": self.max_tokens or default_max_tokens}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            out["ignore_eos"] = True
        return out

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SampledRequest):
    """``POST /v1/completions``. ``prompt``: a string, or token ids, or a list of one of
    either (vLLM's forms); one prompt per request."""

    prompt: Prompt
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()

    def single_prompt(self) -> str | list[int] | None:
        """The one prompt, or None when the body holds a batch (or nothing)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p or all(type(t) is int for t in p):  # an empty list: the client refuses it
            return list(p)  # type: ignore[arg-type]
        if len(p) == 1:
            return p[0]  # type: ignore[return-value]
        return None


class ChatCompletionRequest(SampledRequest):
    """``POST /v1/chat/completions``. ``messages`` stay plain dicts: the chat template
    checks them (roles, content parts) and names the one at fault."""

    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported"
        if self.tools:
            return "tools", "tool calls are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format type 'text' is supported"
        return super().unsupported()

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        out = super().sampling(default_max_tokens)
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins
            out["max_tokens"] = self.max_completion_tokens
        return out


# -- responses --------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "disagg"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
