"""The colocated engine: requests in, one scheduled step at a time, finished sequences
out. Each step is ``schedule() -> run() -> postprocess()``."""

from __future__ import annotations

import time

import torch

from disagg.engine.config import EngineConfig
from disagg.engine.scheduler import Scheduler
from disagg.engine.sequence import Sequence
from disagg.engine.worker import ModelWorker, Prompt, resolve_model_dir
from disagg.errors import InvalidRequestError
from disagg.sampling_params import SamplingParams
from disagg.scheduling import make_policy
from disagg.scheduling.admission import watermark

__all__ = ["LLMEngine", "Prompt", "resolve_model_dir"]


class LLMEngine:
    """The colocated engine: a :class:`ModelWorker` and one continuous-batching
    scheduler over its KV pool."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.worker = worker = make_worker(config)
        self.model_dir = worker.model_dir
        self.model_config = worker.model_config
        self.device = worker.device
        self.dtype = worker.dtype
        self.tokenizer = worker.tokenizer
        self.eos_token_ids = worker.eos_token_ids
        self.max_model_len = worker.max_model_len
        self.model = worker.model
        self.kv_cache = worker.kv_cache
        self.allocator = worker.allocator
        self.runner = worker.runner
        num_blocks = worker.allocator.num_blocks
        self.scheduler = Scheduler(
            self.allocator,
            make_policy(config.policy, config.fairness),
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            # A whole prompt must fit in one prefill batch.
            max_num_batched_tokens=max(config.max_num_batched_tokens, self.max_model_len),
            watermark_blocks=watermark(num_blocks),
        )
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self._next_id = 0
        self._active: dict[int, Sequence] = {}

    # -- requests ------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        client_id: str = "default",
        arrival_time: float | None = None,
    ) -> Sequence:
        """Validates and queues one request; raises :class:`InvalidRequestError` naming
        the bad field, and then nothing is queued."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                "sampling_params", f"must be SamplingParams, got {type(params).__name__}"
            )
        token_ids = self.worker.prompt_token_ids(prompt)
        self.worker.check_stop_token_ids(params.stop_token_ids)
        seq = Sequence(
            seq_id=self._next_id,
            prompt_token_ids=token_ids,
            params=params,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            client_id=client_id,
        )
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.scheduler.add(seq)  # may raise RequestRejectedError (e.g. a rate limit)
        self._next_id += 1
        self._active[seq.seq_id] = seq
        return seq

    def abort(self, seq_id: int) -> bool:
        seq = self._active.pop(seq_id, None)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Runs one prefill or decode batch; returns the sequences it finished."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        tokens = self.worker.execute(batch.seqs, batch.is_prefill, self.generator)
        return self._postprocess(batch.seqs, tokens)

    def close(self) -> None:
        """Stops the rank processes of a parallel engine (nothing to do otherwise)."""
        self.worker.close()

    def _postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        now = time.monotonic()
        finished = []
        for seq, token in zip(seqs, tokens, strict=True):
            seq.output_token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.scheduler.policy.on_tokens(seq, 1)
            reason = self.worker.finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                seq.finish_time = now
                self.scheduler.finish(seq)
                self._active.pop(seq.seq_id, None)
                finished.append(seq)
        return finished

    def output_text(self, seq: Sequence) -> str:
        return self.worker.output_text(seq)


def make_worker(config: EngineConfig) -> ModelWorker:
    """The worker a config asks for: one process, or a leader of tp x pp rank processes
    (close it to stop them)."""
    if config.world_size == 1:
        return ModelWorker(config)
    from disagg.engine.parallel.leader import ParallelModelWorker  # spawns rank processes

    return ParallelModelWorker(config)
