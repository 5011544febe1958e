"""One request as the coordinator owns it, from arrival to its one final reply."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from disagg.protocol.messages import Sampling
from disagg.sampling_params import SamplingParams


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting for a prefill node (prefill policy's queue)
    PREFILLING = "prefilling"  # sent to a prefill node
    WAITING_DECODE = "waiting_decode"  # first token out; waiting for a decode node
    DECODING = "decoding"  # sent to a decode node (pulling, recomputing or running)
    DONE = "done"


@dataclass(eq=False)
class Tracked:
    rid: int
    identity: bytes  # the client's routing id
    request_id: str  # the client's own id
    client_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    params: SamplingParams
    stream: bool
    arrival_time: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.QUEUED
    output_token_ids: list[int] = field(default_factory=list)
    # The output's text as the nodes detokenised it, token by token (what was streamed).
    text_parts: list[str] = field(default_factory=list)
    text_chars: int = 0  # characters in text_parts
    prefill_node: str | None = None  # where it is or was prefilled
    kv_node: str | None = None  # the prefill node holding its KV (until pushed)
    kv_since: float | None = None
    decode_node: str | None = None
    pull_started: bool = False
    input_charged: bool = False
    attempts: int = 0  # failed runs so far
    unplaced_since: float | None = None  # no live node of the kind it needs, since
    # timings (monotonic)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    transfer_s: float | None = None
    finished_at: float | None = None
    in_prefill_backlog: bool = False  # counted by the TTFT predictor
    model_s: float = 0.0  # time in model steps that served it (prefill + decode steps)

    # -- what the scheduling policies read -----------------------------------------

    @property
    def seq_id(self) -> int:
        return self.rid

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)
