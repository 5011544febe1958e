"""Client messages: a ``Generate`` validated, limited and queued for the prefill pool
(or refused with a typed error), an ``Abort``, a ``Ping``."""

from __future__ import annotations

from collections import deque
from typing import Any

from disagg.coordinator.core.endings import Endings
from disagg.coordinator.core.state import log
from disagg.coordinator.tracked import Tracked
from disagg.errors import InvalidRequestError, RequestRejectedError, ServerUnavailable
from disagg.protocol import (
    Abort,
    Accepted,
    Error,
    Generate,
    Ping,
    Pong,
    error_from_exception,
)
from disagg.protocol.messages import made_here


class Intake(Endings):
    def _on_client_message(self, identity: bytes, msg: Any) -> None:
        try:
            if isinstance(msg, Generate):
                self._on_generate(identity, msg)
            elif isinstance(msg, Abort):
                t = self.by_client_key.get((identity, msg.request_id))
                if t is not None:
                    self._finish(t, "abort", reply=False)
            elif isinstance(msg, Ping):
                self._reply(identity, Pong(nonce=msg.nonce))
        except Exception as e:
            log.exception("handling a client message")
            rid = getattr(msg, "request_id", None)
            self._reply(identity, error_from_exception(rid, e))

    def _on_generate(self, identity: bytes, msg: Generate) -> None:
        key = (identity, msg.request_id)
        if key in self.by_client_key:
            self._reply(
                identity,
                Error(
                    request_id=msg.request_id,
                    code="invalid_request",
                    field="request_id",
                    message=f"request_id {msg.request_id!r} is already in flight on this connection",
                ),
            )
            return
        try:
            if not self.accepting:
                raise ServerUnavailable("the server is shutting down", address="")
            identity_ = self.access.resolve(msg.api_key, msg.client_id)
            client = identity_.client_id
            params = msg.sampling.to_params()
            vocab = self.model_config.vocab_size
            for stop_id in params.stop_token_ids:
                if stop_id >= vocab:
                    raise InvalidRequestError(
                        "sampling.stop_token_ids", f"token id {stop_id} is not in [0, {vocab})"
                    )
            prompt_ids = self._prompt_ids(msg.prompt)
            self._check_limits(client, identity_.limits, prompt_ids, params.max_tokens)
        except (InvalidRequestError, RequestRejectedError, ServerUnavailable) as e:
            if self.metrics and isinstance(e, RequestRejectedError):
                self.metrics.request_rejected(msg.client_id, e.reason)
            self._reply(identity, error_from_exception(msg.request_id, e))
            return
        t = Tracked(
            rid=next(self._rids),
            identity=identity,
            request_id=msg.request_id,
            client_id=client,
            prompt_token_ids=prompt_ids,
            sampling=msg.sampling,
            params=params,
            stream=msg.stream,
            arrival_time=self.now,
        )
        try:
            self._check_predicted_ttft(t)
            self.pools.prefill.add(t)
        except RequestRejectedError as e:  # e.g. the RPM limit
            if self.metrics:
                self.metrics.request_rejected(client, e.reason)
            self._reply(identity, error_from_exception(msg.request_id, e))
            return
        self.requests[t.rid] = t
        self.by_client_key[key] = t
        self.ttft_predictor.add(t.num_prompt_tokens)
        t.in_prefill_backlog = True
        self.in_flight_per_client[client] = self.in_flight_per_client.get(client, 0) + 1
        self.events.record(
            str(t.rid),
            "arrived",
            client_id=client,
            request_id=t.request_id,
            t=t.arrival_time,
        )
        if self.metrics:
            self.metrics.request_arrived(client)
        # (unvalidated: the id was validated on receipt, the token ids by _prompt_ids)
        accepted = made_here(
            Accepted, request_id=msg.request_id, prompt_token_ids=t.prompt_token_ids
        )
        self._reply(identity, accepted)

    def _check_predicted_ttft(self, t: Tracked) -> None:
        s = self.settings
        if s.slo is None or s.reject_over_slo is None:
            return
        predicted = self.ttft_predictor.predict(
            t.num_prompt_tokens, len(self.live_nodes("prefill"))
        )
        limit = s.reject_over_slo * s.slo[0]
        if predicted is not None and predicted > limit:
            raise RequestRejectedError(
                "slo",
                f"predicted TTFT {predicted:.3f} s is over {s.reject_over_slo:g} x the TTFT SLO "
                f"of {s.slo[0]:g} s ({self.ttft_predictor.backlog_tokens} prompt tokens ahead)",
            )

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if not prompt:
            raise InvalidRequestError("prompt", "is empty")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer: send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.model_config.vocab_size
            if max(prompt) >= vocab:  # (one pass in C; the position only when refused)
                bad = next(i for i, t in enumerate(prompt) if t >= vocab)
                raise InvalidRequestError(
                    "prompt", f"token id {prompt[bad]} at position {bad} is not in [0, {vocab})"
                )
            ids = list(prompt)
        limit = self.max_model_len()
        if len(ids) >= limit:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens leave no room to generate: max_model_len is {limit}"
            )
        return ids

    def _check_limits(self, client: str, limits: Any, prompt_ids: list[int], max_tokens: int):
        if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
            raise RequestRejectedError(
                "prompt_too_long",
                f"the prompt has {len(prompt_ids)} tokens; this client may send at most "
                f"{limits.max_prompt_tokens}",
            )
        if limits.max_tokens is not None and max_tokens > limits.max_tokens:
            raise RequestRejectedError(
                "max_tokens_limit",
                f"max_tokens {max_tokens} is over this client's limit of {limits.max_tokens}",
            )
        rpm = limits.requests_per_minute
        now = self.now
        if rpm is not None:
            window = self._recent.setdefault(client, deque())
            while window and now - window[0] >= 60.0:
                window.popleft()
            if len(window) >= rpm:
                raise RequestRejectedError(
                    "rate_limit",
                    f"client {client!r} sent {len(window)} requests in the last minute "
                    f"(limit {rpm} per minute)",
                )
        queued = self.in_flight_per_client.get(client, 0)
        cap = limits.max_in_flight_per_client or self.settings.max_in_flight_per_client
        if queued >= cap:
            raise RequestRejectedError(
                "queue_full",
                f"client {client!r} already has {queued} requests in flight (limit {cap})",
            )
        if rpm is not None:
            window.append(now)
