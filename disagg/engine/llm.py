"""The offline API: ``LLM(model).generate(prompts, sampling_params)``."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from disagg.engine.config import EngineConfig
from disagg.engine.engine import LLMEngine, Prompt
from disagg.engine.sequence import Sequence
from disagg.errors import ConfigError, DisaggError, InvalidRequestError, RequestRejectedError
from disagg.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestOutput:
    """One prompt's result. ``error`` is set (and ``finish_reason == "error"``) when the
    request was rejected; the other requests of the call still ran."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: DisaggError | None = None
    num_preemptions: int = 0
    arrival_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


class LLM:
    """Offline batched generation with continuous batching over a paged KV cache.

    ``model`` is a local Hugging Face directory or ``"tiny"`` (the embedded model).
    Keyword arguments are :class:`EngineConfig` fields: ``device``, ``dtype``,
    ``block_size``, ``num_blocks`` or ``kv_cache_memory`` (bytes), ``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``policy``, ``seed``, ``enforce_eager``,
    ``tensor_parallel_size``, ``pipeline_parallel_size``.

    With ``tensor_parallel_size * pipeline_parallel_size > 1`` the model runs on that
    many rank processes that ``LLM`` starts (docs/parallel.md); ``close()`` — or leaving
    a ``with LLM(...) as llm:`` block — stops them, and they also end if this process
    dies. Single-process engines need no ``close()`` (it is harmless).
    """

    def __init__(self, model: str = "tiny", **engine_kwargs: object):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise ConfigError(
                unknown[0], f"unknown engine setting; known: {', '.join(sorted(known))}"
            )
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_kwargs))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stops the engine's rank processes, if it has any (idempotent)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        client_id: str | list[str] = "default",
    ) -> list[RequestOutput]:
        """Generates for every prompt and returns the results in input order.

        ``prompts`` is one prompt or a list of them; a prompt is a string or a list of
        token ids. ``sampling_params`` and ``client_id`` (whom the fair policies charge)
        are one for all or one per prompt. A request that is invalid or rejected (e.g. by
        a rate limit) gets an output carrying its typed error; the others run normally.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _per_prompt(
            sampling_params, len(prompt_list), "sampling_params", SamplingParams
        )
        client_list = _per_prompt(client_id, len(prompt_list), "client_id", str)
        outputs: list[RequestOutput | None] = [None] * len(prompt_list)
        pending: dict[int, tuple[int, Prompt]] = {}
        for index, (prompt, params, client) in enumerate(
            zip(prompt_list, params_list, client_list, strict=True)
        ):
            try:
                seq = self.engine.add_request(prompt, params, client_id=client)
            except (InvalidRequestError, RequestRejectedError) as exc:
                log.warning("request %d rejected: %s", index, exc)
                outputs[index] = _rejected(prompt, exc)
                continue
            pending[seq.seq_id] = (index, prompt)
        while self.engine.has_unfinished():
            for seq in self.engine.step():
                index, prompt = pending.pop(seq.seq_id)
                outputs[index] = self._output(seq, prompt)
        assert not pending, "engine went idle with requests unfinished"
        return [o for o in outputs if o is not None]

    def _output(self, seq: Sequence, prompt: Prompt) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=self.engine.output_text(seq),
            finish_reason=seq.finish_reason,
            num_preemptions=seq.num_preemptions,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            finish_time=seq.finish_time,
        )


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple):
        # One prompt given as token ids: a list holding no prompt at all (no string or
        # list). A bad entry ([5, 2.5]) then makes one bad prompt naming that entry, not
        # two "prompts" 5 and 2.5.
        if prompts and not any(isinstance(t, str | list | tuple) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise InvalidRequestError(
        "prompts",
        f"must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}",
    )


def _per_prompt(value, n: int, field: str, kind: type) -> list:
    """One value for all prompts, or a list of one per prompt."""
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise InvalidRequestError(
            field, f"{len(values)} given for {n} prompts; pass one, or one per prompt"
        )
    return values


def _rejected(prompt: Prompt, error: DisaggError) -> RequestOutput:
    return RequestOutput(
        request_id=-1,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=[],
        token_ids=[],
        text="",
        finish_reason="error",
        error=error,
    )
