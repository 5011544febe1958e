"""Timing the real engine for ``disagg profile``.

The engine (:class:`ModelWorker` and its runner, as a node holds them) runs a grid of
prefill batches (B prompts of L tokens: Σl = B·L, Σl² = B·L²) and decode steps (B
sequences whose contexts spread evenly over (0, 2C), as a served batch's do: Σctx ≈ B·C).
Each point is warmed up once, then timed ``repeats`` times and the median kept; the
samples are fitted by :mod:`disagg.planner.fit`, and KV bytes per token and KV capacity
come from the pool the worker built (what a node with the same settings gets). The
result is a :class:`LatencyProfile` (docs/latency-model.md), the file that
``disagg simulate`` and ``disagg plan --latency-profile`` read.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import torch

from disagg.errors import ConfigError
from disagg.planner.fit import Fit, Sample, decode_contexts, fit_decode, fit_lines, fit_prefill
from disagg.sim.latency import DecodePiece, LatencyProfile, TpProfile

# Default grids: prompt lengths and batch sizes bracket what a node batches (the token
# budget is 8192); decode contexts (means; spread over twice that) reach 2048 tokens.
PREFILL_LENS = (16, 64, 256, 1024)
PREFILL_BATCHES = (1, 2, 4, 8)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DECODE_CONTEXTS = (32, 256, 1024)


@dataclass(frozen=True)
class ProfileGrid:
    """Prefill points as (batch size, prompt length); decode as (batch size, context)."""

    prefill: tuple[tuple[int, int], ...]
    decode: tuple[tuple[int, int], ...]

    @classmethod
    def product(
        cls,
        prefill_batches: Iterable[int] = PREFILL_BATCHES,
        prefill_lens: Iterable[int] = PREFILL_LENS,
        decode_batches: Iterable[int] = DECODE_BATCHES,
        decode_contexts: Iterable[int] = DECODE_CONTEXTS,
        *,
        max_batch_tokens: int = 8192,
        max_model_len: int | None = None,
    ) -> ProfileGrid:
        """Every combination, less prefill batches over the token budget and lengths
        the model cannot hold."""
        limit = max_model_len or sys.maxsize
        prefill = tuple(
            (b, n)
            for n in prefill_lens
            for b in prefill_batches
            if n < limit and b * n <= max(max_batch_tokens, n)
        )
        decode = tuple((b, c) for c in decode_contexts for b in decode_batches if 2 * c < limit)
        return cls(prefill, decode)


@dataclass
class ProfileResult:
    profile: LatencyProfile
    prefill_samples: list[Sample]
    decode_samples: list[Sample]
    prefill_fit: Fit
    decode_pieces: list[tuple[int | None, Fit]]
    seconds: float
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def decode_errors(self) -> list[float]:
        return [e for _, fit in self.decode_pieces for e in fit.errors]

    def summary(self) -> str:
        p = self.profile.tp[next(iter(self.profile.tp))]
        lines = [
            f"profiled {self.profile.model_name} on {self.profile.gpu} in {self.seconds:.1f} s: "
            f"{len(self.prefill_samples)} prefill and {len(self.decode_samples)} decode points",
            *fit_lines(p, self.prefill_fit, self.decode_errors),
        ]
        lines.append(
            f"KV: {self.profile.kv_bytes_per_token} bytes per token, capacity "
            f"{p.kv_capacity_tokens} tokens"
        )
        return "\n".join(lines)


# -- measuring -------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal stream (stderr); plain lines elsewhere."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.done, self.width = total, 0, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.start = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // max(self.total, 1)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{time.monotonic() - self.start:5.1f}s {label}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(78))
            if self.done == self.total:
                self.stream.write("\n")
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sequences(worker, batch: int, length: int, decode: bool):
    """``batch`` sequences with KV blocks allocated: prompts of ``length`` tokens, or
    decode contexts from :func:`decode_contexts`. A decode sequence's context is its
    prompt plus one output token (the token fed this step); what its KV holds does not
    change the time, so nothing is prefilled first."""
    from disagg.engine.sequence import Sequence, blocks_for_tokens
    from disagg.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(batch * 100_003 + length)
    vocab = worker.model_config.vocab_size
    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    lengths = decode_contexts(batch, length) if decode else [length] * batch
    seqs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        seq = Sequence(i, ids[:-1] if decode else ids, params, arrival_time=0.0)
        if decode:
            seq.output_token_ids.append(ids[-1])
        seq.block_table = worker.allocator.allocate(blocks_for_tokens(n, worker.block_size))
        seqs.append(seq)
    return seqs


def measure(
    worker, grid: ProfileGrid, repeats: int, progress: Progress | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Times every grid point on ``worker``: prefill as a prefill node's step does it
    (runner.prefill, then sampling), decode as a decode node's (runner.decode, sampling)."""

    def run(phase: str, batch: int, length: int) -> Sample:
        seqs = _sequences(worker, batch, length, decode=phase == "decode")
        prefill = phase == "prefill"
        try:
            # execute = runner + sampling, in this process or on a parallel worker's ranks
            ms = _timed(lambda: worker.execute(seqs, prefill, None), worker.device, repeats)
        finally:
            for s in seqs:
                worker.allocator.free(s.block_table)
        if progress is not None:
            progress.step(f"{phase} B={batch} L={length}: {ms:.2f} ms")
        return Sample(batch, length, ms)

    prefill = [run("prefill", b, n) for b, n in grid.prefill]
    decode = [run("decode", b, c) for b, c in grid.decode]
    return prefill, decode


def _check_grid(grid: ProfileGrid, worker) -> None:
    cap = worker.allocator.num_blocks * worker.block_size
    for phase, points in (("prefill", grid.prefill), ("decode", grid.decode)):
        if len({p for p in points}) < 3:
            raise ConfigError(
                f"grid.{phase}",
                f"needs at least 3 distinct points to fit 3 coefficients, got {len(set(points))}",
            )
        for b, n in points:
            if b < 1 or n < 2:
                raise ConfigError(f"grid.{phase}", f"batch >= 1 and length >= 2, got ({b}, {n})")
            lengths = decode_contexts(b, n) if phase == "decode" else [n] * b
            if max(lengths) >= worker.max_model_len:
                raise ConfigError(
                    f"grid.{phase}",
                    f"({b}, {n}) needs {max(lengths)} tokens of context; the model's "
                    f"max_model_len is {worker.max_model_len}",
                )
            if sum(-(-x // worker.block_size) * worker.block_size for x in lengths) > cap:
                raise ConfigError(
                    f"grid.{phase}", f"{b} x {n} tokens exceed the KV pool of {cap} tokens"
                )


def _engine_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def profile_engine(
    model: str = "tiny",
    device: str = "cpu",
    *,
    tp: int = 1,
    pp: int = 1,
    threads: int = 1,
    grid: ProfileGrid | None = None,
    repeats: int = 5,
    dtype: str = "auto",
    num_blocks: int | None = None,
    progress: bool = True,
) -> ProfileResult:
    """Profile ``model`` on ``device`` at tensor-parallel degree ``tp`` and ``pp``
    pipeline stages with ``threads`` torch CPU threads (at tp x pp > 1: the real parallel
    engine, whose ranks share the machine's cores; docs/parallel.md).

    At ``pp > 1`` a lone batch passes every stage, so the fit is the whole pipeline's
    latency: the profile's convention (the latency model divides it by ``pp`` for the
    interval between batches of a full pipeline). The pool of a pp-stage instance is
    recorded as ``kv_capacity_tokens_by_pp``; the pp = 1 capacity the format also needs
    is estimated as that pool over ``pp`` (one stage's layers per device), and
    ``sources`` says so."""
    from disagg.engine.config import EngineConfig
    from disagg.engine.engine import make_worker
    from disagg.engine.kv_cache import KVCacheSpec

    if not isinstance(tp, int) or tp < 1:
        raise ConfigError("tp", f"must be an integer >= 1, got {tp!r}")
    if not isinstance(pp, int) or pp < 1:
        raise ConfigError("pp", f"must be an integer >= 1, got {pp!r}")
    if threads < 1:
        raise ConfigError("threads", f"must be >= 1, got {threads}")
    if repeats < 1:
        raise ConfigError("repeats", f"must be >= 1, got {repeats}")
    t0 = time.monotonic()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        worker = make_worker(
            EngineConfig(
                model=model,
                device=device,
                dtype=dtype,
                num_blocks=num_blocks,
                tensor_parallel_size=tp,
                pipeline_parallel_size=pp,
            )
        )
        try:
            if grid is None:
                grid = ProfileGrid.product(max_model_len=worker.max_model_len)
            _check_grid(grid, worker)
            bar = Progress(len(grid.prefill) + len(grid.decode)) if progress else None
            prefill, decode = measure(worker, grid, repeats, bar)
        finally:
            worker.close()
    finally:
        torch.set_num_threads(previous_threads)
    prefill_fit = fit_prefill(prefill)
    pieces = fit_decode(decode)
    # The whole model's KV per token (what a hand-off moves), whatever the layout.
    spec = KVCacheSpec.for_model(worker.model_config, worker.block_size, worker.dtype)
    kv_bytes = spec.bytes_per_block // spec.block_size
    capacity = worker.allocator.num_blocks * worker.block_size
    where = "cpu" if worker.device.type == "cpu" else torch.cuda.get_device_name(worker.device)
    sources = {
        "engine": f"disagg {_engine_commit()}, torch {torch.__version__}",
        "device": f"{where}, {threads} torch thread(s), dtype {str(worker.dtype).removeprefix('torch.')}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "method": f"median of {repeats} timed runs per point after one warm-up; "
        "non-negative least squares on relative error",
        "kv_capacity_tokens": f"{worker.allocator.num_blocks} blocks x {worker.block_size} tokens, "
        "the pool the worker sized",
    }
    by_pp: dict[str, int] = {}
    if pp > 1:
        by_pp[str(pp)] = capacity
        capacity = max(1, capacity // pp)
        sources["layout"] = f"timed at tp {tp} x pp {pp}: batch times are the whole pipeline's"
        sources["kv_capacity_tokens"] += (
            f" at pp {pp} (kv_capacity_tokens_by_pp); pp 1 estimated as it / {pp}"
        )
    profile = LatencyProfile(
        unit="ms",
        model_name=worker.model_dir.name if model != "tiny" else "tiny",
        gpu=device if device == "cpu" else where,
        kv_bytes_per_token=kv_bytes,
        tp={
            str(tp): TpProfile(
                prefill=list(prefill_fit.coef),
                decode=[DecodePiece(max_batch=cut, coef=list(f.coef)) for cut, f in pieces],
                kv_capacity_tokens=capacity,
                kv_capacity_tokens_by_pp=by_pp,
                fit_error={
                    "prefill_median": prefill_fit.median_error,
                    "prefill_max": prefill_fit.max_error,
                    "decode_median": statistics.median(e for _, f in pieces for e in f.errors),
                    "decode_max": max(e for _, f in pieces for e in f.errors),
                },
            )
        },
        sources=sources,
    )
    return ProfileResult(profile, prefill, decode, prefill_fit, pieces, time.monotonic() - t0)
