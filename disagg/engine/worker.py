"""One model on one device with its paged KV pool: what every process that runs the
model holds (the colocated engine, a prefill node, a decode node).

``ModelWorker`` loads the checkpoint and tokenizer, sizes and allocates the KV pool,
builds the runner, validates prompts against the model, and knows when a sequence is
done (eos, stop ids, stop strings, length). Scheduling is not its business.
"""

from __future__ import annotations

import itertools
import logging

import torch

from disagg.engine.attention_metadata import AttentionMetadata
from disagg.engine.block_allocator import BlockAllocator
from disagg.engine.checkpoint import load_model
from disagg.engine.config import DEFAULT_CPU_KV_MEMORY, EngineConfig
from disagg.engine.device import decode_graphs_refusal, make_current
from disagg.engine.device import resolve as resolve_device
from disagg.engine.kv_cache import (
    CUDA_CONTEXT_BYTES,
    KVCache,
    KVCacheSpec,
    MemoryBudget,
    graph_pool_bytes,
    sampler_bytes,
    transfer_bytes,
)
from disagg.engine.model_config import DTYPES, ModelConfig
from disagg.engine.model_source import resolve_model_dir
from disagg.engine.parallel.handoff import KVNodeLayout
from disagg.engine.parallel.layout import ParallelLayout
from disagg.engine.runner import ModelRunner
from disagg.engine.sampler import sample
from disagg.engine.sequence import Sequence
from disagg.engine.tokenizer import Tokenizer, eos_token_ids
from disagg.errors import ConfigError, InvalidRequestError

log = logging.getLogger(__name__)

Prompt = str | list[int]

__all__ = ["ModelWorker", "Prompt", "resolve_model_dir"]


class ModelWorker:
    """``decode_graphs=False``: no decode CUDA graphs (a prefill node never decodes).
    ``transfers``: this process moves KV to or from peers (a node): its pool leaves room
    for their staging buffers."""

    def __init__(
        self, config: EngineConfig, *, decode_graphs: bool = True, transfers: bool = False
    ):
        self._decode_graphs = decode_graphs and not config.enforce_eager
        self._transfers = transfers
        self.config = config
        self.layout = ParallelLayout(1, 1)  # one process holds the whole model
        self.model_dir = resolve_model_dir(config.model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        device = torch.device(config.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("device", "CUDA was asked for but torch sees no CUDA device")
            if (device.index or 0) >= torch.cuda.device_count():
                raise ConfigError(
                    "device", f"{device} does not exist: {torch.cuda.device_count()} GPU(s) visible"
                )
        self.device = resolve_device(device)
        # Loading, profiling and graph capture run on this thread: on our device. Other
        # threads that touch CUDA make it current themselves (disagg.engine.device).
        make_current(self.device)
        self.dtype = self._resolve_dtype()
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        if self.tokenizer is None:
            log.warning(
                "%s has no tokenizer.json: only token-id prompts can be served", self.model_dir
            )
        self.eos_token_ids = eos_token_ids(self.model_dir, self.model_config.eos_token_ids)

        context = self.model_config.max_context
        max_len = config.max_model_len or context
        if max_len > context:
            raise ConfigError(
                "max_model_len", f"{max_len} exceeds the model's context of {context}"
            )
        self.model = load_model(
            self.model_dir,
            self.model_config,
            device=self.device,
            dtype=self.dtype,
            max_positions=max_len,
        )
        spec = KVCacheSpec.for_model(self.model_config, config.block_size, self.dtype)
        num_blocks = config.num_blocks or spec.blocks_for_budget(self._kv_budget(spec, max_len))
        # One sequence must always fit alone, or preemption could never make room for it.
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        if self.max_model_len < max_len:
            log.info("max_model_len capped to the KV pool: %d tokens", self.max_model_len)
        self.block_size = config.block_size
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            use_cuda_graphs=self._decode_graphs,
        )

    def execute(
        self, seqs: list[Sequence], is_prefill: bool, generator: torch.Generator | None
    ) -> list[int]:
        """Runs one batch and samples each sequence's next token."""
        logits = self.runner.prefill(seqs) if is_prefill else self.runner.decode(seqs)
        return sample(logits, seqs, generator)

    def forget(self, seq_id: int) -> None:
        """``seq_id`` will not be run again. One process keeps no state per sequence
        outside it; a parallel worker's driver rank does (its sampling state)."""

    @property
    def fingerprint(self) -> str:
        """The model as nodes and the coordinator compare it: directory name, shape and
        dtype."""
        c = self.model_config
        return (
            f"{self.model_dir.name}:L{c.num_layers}:H{c.num_heads}/{c.num_kv_heads}:"
            f"D{c.head_dim}:V{c.vocab_size}:{str(self.dtype).removeprefix('torch.')}"
        )

    @property
    def kv_layout(self) -> KVNodeLayout:
        """Its KV pool's shape and parallel layout, as a node registers it."""
        return KVNodeLayout.of(
            self.fingerprint, self.model_config, self.block_size, self.dtype, self.layout
        )

    @property
    def num_blocks(self) -> int:
        """KV blocks of the pool (per rank, the same ids on every rank)."""
        return self.allocator.num_blocks

    def close(self) -> None:
        """Nothing to stop in one process (a parallel worker stops its ranks)."""

    # -- prompts -------------------------------------------------------------------

    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt as token ids, checked against the vocabulary and the context;
        raises :class:`InvalidRequestError` naming the bad field."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "is empty")
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "prompt", "this model has no tokenizer.json: pass token ids"
                )
            ids = self.tokenizer.encode(prompt)
            field = "prompt"
        elif isinstance(prompt, list | tuple):
            if not prompt:
                raise InvalidRequestError("prompt_token_ids", "is empty")
            vocab = self.model_config.vocab_size
            for i, t in enumerate(prompt):
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise InvalidRequestError(
                        "prompt_token_ids", f"entry {i} ({t!r}) is not a token id in [0, {vocab})"
                    )
            ids = list(prompt)
            field = "prompt_token_ids"
        else:
            raise InvalidRequestError(
                "prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        if len(ids) >= self.max_model_len:
            pool = self.allocator.num_blocks * self.config.block_size
            raise InvalidRequestError(
                field,
                f"{len(ids)} tokens leave no room to generate: max_model_len is {self.max_model_len} "
                f"(model context {self.model_config.max_context}, KV pool {pool} tokens)",
            )
        return ids

    def check_stop_token_ids(self, stop_token_ids: tuple[int, ...]) -> None:
        vocab = self.model_config.vocab_size
        for t in stop_token_ids:
            if t >= vocab:
                raise InvalidRequestError(
                    "stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab})"
                )

    # -- stopping ------------------------------------------------------------------

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        """Why ``seq`` is done now that ``token`` (already appended) was produced, or
        None. A stop string sets ``seq.text_end``."""
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        if params.stop and self.tokenizer is not None and self._hit_stop_string(seq):
            return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # A stop string of c characters spans at most 4c byte-level tokens; decoding that
        # tail each step keeps the check O(1) in the output length.
        assert self.tokenizer is not None
        window = 4 * max(len(s) for s in seq.params.stop) + 2
        tail = self.tokenizer.decode(seq.output_token_ids[-window:])
        if not any(s in tail for s in seq.params.stop):
            return False
        text = self.tokenizer.decode(seq.output_token_ids)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.text_end = min(hits)
        return True

    def output_text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(seq.output_token_ids)
        return text if seq.text_end is None else text[: seq.text_end]

    # -- set-up helpers ------------------------------------------------------------

    def _resolve_dtype(self) -> torch.dtype:
        if self.config.dtype != "auto":
            return DTYPES[self.config.dtype]
        return self.model_config.dtype if self.device.type == "cuda" else torch.float32

    def _kv_budget(self, spec: KVCacheSpec, max_len: int) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if self.device.type == "cpu":
            return DEFAULT_CPU_KV_MEMORY
        budget = self._memory_budget(spec, max_len)
        log.info("%s: %s", self.device, budget.describe())
        if budget.kv_bytes <= 0:
            raise ConfigError(
                "gpu_memory_utilization",
                f"{self.config.gpu_memory_utilization} of the GPU leaves no room for the KV "
                f"cache: {budget.describe()}",
            )
        return budget.kv_bytes

    def _memory_budget(self, spec: KVCacheSpec, max_len: int) -> MemoryBudget:
        """This process's share of the GPU, less what it holds (weights), less what must
        stay free for what runs once the pool is allocated (see ``MemoryBudget``)."""
        from kv_transfer.p2p import DEFAULT_PIPELINE_DEPTH

        c, cfg = self.model_config, self.config
        activations = self._peak_prefill_bytes(spec, max_len)  # measured by running one
        free, total = torch.cuda.mem_get_info(self.device)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        graphs = 0
        if self._decode_graphs and decode_graphs_refusal(self.device, enforce_eager=False) is None:
            graphs = graph_pool_bytes(
                cfg.max_num_seqs, c.hidden_size, c.intermediate_size, itemsize
            )
        largest_transfer = max(max_len, cfg.max_num_batched_tokens)
        return MemoryBudget(
            total=total,
            free=free,
            utilization=cfg.gpu_memory_utilization,
            ours=torch.cuda.memory_reserved(self.device) + CUDA_CONTEXT_BYTES,
            activations=activations,
            graphs=graphs,
            sampler=sampler_bytes(cfg.max_num_seqs, c.vocab_size),
            transfers=transfer_bytes(spec, largest_transfer, DEFAULT_PIPELINE_DEPTH, nccl=True)
            if self._transfers
            else 0,
        )

    @torch.inference_mode()
    def _peak_prefill_bytes(self, spec: KVCacheSpec, max_len: int) -> int:
        """Runs a dummy prefill of ``max_num_batched_tokens`` tokens (in sequences no
        longer than ``max_len``) against a one-block cache that stores nothing, and
        returns the memory it needed beyond the weights."""
        tokens = max(self.config.max_num_batched_tokens, max_len)
        lens = [max_len] * (tokens // max_len) + ([tokens % max_len] if tokens % max_len else [])
        cu_seqlens = torch.tensor(
            [0, *itertools.accumulate(lens)], dtype=torch.int32, device=self.device
        )
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])  # (T,)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.full((tokens,), -1, dtype=torch.long, device=self.device),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lens),
        )
        scratch = KVCache(spec, 1, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        hidden = self.model(
            torch.zeros(tokens, dtype=torch.long, device=self.device),
            positions,
            scratch.layers,
            meta,
        )
        self.model.compute_logits(hidden[: self.config.max_num_seqs])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden, scratch
        torch.cuda.empty_cache()
        return peak
