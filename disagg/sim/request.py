"""One simulated request: what the policies read (the same attributes as the engine's
``Sequence``), what the simulator tracks, and the lifetime events metrics need."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class SimRequest:
    seq_id: int
    client_id: str
    arrival_time: float
    prompt_len: int
    output_len: int  # tokens the request will produce, the first one at prefill
    produced: int = 0
    # Tokens a re-prefill after a preemption must recompute (prompt + produced).
    recompute_len: int = 0
    num_preemptions: int = 0
    # Lifetime events (seconds; None until they happen).
    prefill_start: float | None = None
    first_token_time: float | None = None
    transfer_end: float | None = None
    decode_start: float | None = None
    finish_time: float | None = None
    instance: int = -1  # the instance holding its KV now

    # -- what policies read --------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_len

    @property
    def num_output_tokens(self) -> int:
        return self.produced

    # -- derived -------------------------------------------------------------------
    @property
    def context(self) -> int:
        """Tokens whose KV the request holds once prefilled."""
        return self.prompt_len + self.produced

    @property
    def remaining(self) -> int:
        return self.output_len - self.produced

    @property
    def prefill_tokens(self) -> int:
        """Tokens the next prefill of this request computes."""
        return self.recompute_len or self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_time is not None

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (0 for one-token outputs)."""
        if self.finish_time is None or self.first_token_time is None:
            return None
        if self.output_len <= 1:
            return 0.0
        return (self.finish_time - self.first_token_time) / (self.output_len - 1)
