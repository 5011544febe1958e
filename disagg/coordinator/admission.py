"""SLO-aware early rejection: predict a new request's TTFT from the prefill backlog and
the prefill rate the nodes achieve, and refuse at once a request that would miss its SLO
by a wide margin, instead of queueing it to fail (Mooncake's early rejection).

The prediction is deliberately simple and conservative: every token waiting for or in
prefill is counted ahead of the new request (under a fair policy a light client may in
fact go first), divided over the live prefill nodes at the measured rate.
"""

from __future__ import annotations


class TTFTPredictor:
    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.tokens_per_s: float | None = None  # one prefill node's measured rate
        self.backlog_tokens = 0  # prompt tokens queued or being prefilled

    def observe_batch(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        if self.tokens_per_s is None:
            self.tokens_per_s = rate
        else:
            self.tokens_per_s += self.smoothing * (rate - self.tokens_per_s)

    def add(self, tokens: int) -> None:
        self.backlog_tokens += tokens

    def remove(self, tokens: int) -> None:
        self.backlog_tokens = max(0, self.backlog_tokens - tokens)

    def predict(self, prompt_tokens: int, prefill_nodes: int) -> float | None:
        """Seconds to the first token, or None before any batch was measured."""
        if self.tokens_per_s is None or prefill_nodes < 1:
            return None
        return (self.backlog_tokens + prompt_tokens) / (self.tokens_per_s * prefill_nodes)
