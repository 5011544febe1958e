"""``disagg profile``: time the real engine and fit DistServe's latency form to it.

The engine (:class:`ModelWorker` and its runner, as a node holds them) runs a grid of
prefill batches (B prompts of L tokens: Σl = B·L, Σl² = B·L²) and decode steps (B
sequences whose contexts spread evenly over (0, 2C), as a served batch's do: Σctx ≈ B·C). Each point is warmed up once, then timed
``repeats`` times and the median kept. Then, in milliseconds,

- prefill ``T = a + b·Σl + c·Σl²`` and decode ``T = a + b·Σctx + c·B`` are fitted by
  non-negative least squares on *relative* error (each row divided by its measured time,
  as DistServe's fit does, constrained to ≥ 0 so no batch is faster than a smaller one);
- decode may be split in two pieces at a batch size, when that halves the squared error;
- KV bytes per token and KV capacity come from the pool the worker built (what a node
  with the same settings gets).

The result is a :class:`LatencyProfile` (docs/latency-model.md), the file that
``disagg simulate`` and ``disagg plan --latency-profile`` read.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from disagg.errors import ConfigError
from disagg.sim.latency import DecodePiece, LatencyProfile, TpProfile

# Default grids: prompt lengths and batch sizes bracket what a node batches (the token
# budget is 8192); decode contexts (means; spread over twice that) reach 2048 tokens.
PREFILL_LENS = (16, 64, 256, 1024)
PREFILL_BATCHES = (1, 2, 4, 8)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DECODE_CONTEXTS = (32, 256, 1024)
# A two-piece decode fit is kept only when it at least halves the squared relative error.
SPLIT_GAIN = 0.5


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


@dataclass(frozen=True)
class Sample:
    """One grid point: its features and its median time (ms)."""

    batch_size: int
    length: int  # prompt length (prefill) or context (decode)
    ms: float

    @property
    def tokens(self) -> int:
        return self.batch_size * self.length


@dataclass
class Fit:
    coef: tuple[float, float, float]  # a, b, c in ms
    errors: list[float]  # |predicted - measured| / measured, per sample

    @property
    def median_error(self) -> float:
        return statistics.median(self.errors)

    @property
    def max_error(self) -> float:
        return max(self.errors)


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


def fit_lines(p: TpProfile, prefill_fit: Fit, decode_errors: list[float]) -> list[str]:
    """The fitted prefill and decode formulas of one tp degree with their relative errors,
    one line each (``disagg profile`` and ``--from-served`` print them)."""
    lines = [
        f"prefill  T = {_abc(p.prefill)} ms   relative error median "
        f"{prefill_fit.median_error:.1%}, max {prefill_fit.max_error:.1%}"
    ]
    for piece in p.decode:
        bound = "any B" if piece.max_batch is None else f"B <= {piece.max_batch}"
        lines.append(f"decode   T = {_abc(piece.coef, 'Σctx', 'B')} ms   ({bound})")
    lines.append(
        f"decode   relative error median {statistics.median(decode_errors):.1%}, "
        f"max {max(decode_errors):.1%}"
    )
    return lines


def _abc(coef: Iterable[float], x: str = "Σl", y: str = "Σl²") -> str:
    a, b, c = coef
    return f"{a:.4g} + {b:.4g}·{x} + {c:.4g}·{y}"


# -- fitting --------------------------------------------------------------------------


def nnls_relative(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Coefficients ``x ≥ 0`` minimising Σ ((features·x − t) / t)².

    With three unknowns the exact answer is found by trying every support: the optimum
    is the unconstrained least-squares solution on its own support, and every support
    whose solution is non-negative is a feasible point, so the best of those is optimal.
    """
    if features.ndim != 2 or features.shape[0] != times.shape[0]:
        raise ValueError(f"features {features.shape} do not match times {times.shape}")
    if (times <= 0).any():
        raise ValueError("every measured time must be > 0")
    rows = features / times[:, None]
    scale = np.abs(rows).max(axis=0)
    scale[scale == 0] = 1.0
    rows = rows / scale  # columns of comparable size: Σl² is ~1e6 times Σl
    target = np.ones(len(times))
    k = features.shape[1]
    best, best_cost = np.zeros(k), float(len(times))  # all zero: every row misses by 100%
    for support in itertools.product((False, True), repeat=k):
        cols = [i for i in range(k) if support[i]]
        if not cols:
            continue
        sol, *_ = np.linalg.lstsq(rows[:, cols], target, rcond=None)
        if (sol < 0).any():
            continue
        x = np.zeros(k)
        x[cols] = sol
        cost = float(np.sum((rows @ x - target) ** 2))
        if cost < best_cost - 1e-15:
            best, best_cost = x, cost
    return best / scale


def _fit(features: np.ndarray, samples: list[Sample]) -> Fit:
    times = np.array([s.ms for s in samples])
    coef = nnls_relative(features, times)
    predicted = features @ coef
    errors = [float(e) for e in np.abs(predicted - times) / times]
    return Fit((float(coef[0]), float(coef[1]), float(coef[2])), errors)


def fit_prefill(samples: list[Sample]) -> Fit:
    """``a + b·Σl + c·Σl²`` over batches of equal prompts."""
    x = np.array([[1.0, s.tokens, s.batch_size * s.length**2] for s in samples])
    return _fit(x, samples)


def _decode_features(samples: list[Sample]) -> np.ndarray:
    return np.array(
        [[1.0, sum(decode_contexts(s.batch_size, s.length)), s.batch_size] for s in samples]
    )


def fit_decode(samples: list[Sample]) -> list[tuple[int | None, Fit]]:
    """One piece, or two split at a profiled batch size when that halves the squared
    relative error (each piece keeps at least two batch sizes and four points)."""
    single = _fit(_decode_features(samples), samples)
    best: list[tuple[int | None, Fit]] = [(None, single)]
    best_cost = sum(e * e for e in single.errors)
    sizes = sorted({s.batch_size for s in samples})
    for cut in sizes[1:-2]:
        low = [s for s in samples if s.batch_size <= cut]
        high = [s for s in samples if s.batch_size > cut]
        if len(low) < 4 or len(high) < 4 or len({s.batch_size for s in high}) < 2:
            continue
        pieces = [
            (cut, _fit(_decode_features(low), low)),
            (None, _fit(_decode_features(high), high)),
        ]
        cost = sum(e * e for _, f in pieces for e in f.errors)
        if cost < SPLIT_GAIN * best_cost:
            best, best_cost = pieces, cost
    return best


# -- measuring ------------------------------------------------------------------------


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


def decode_contexts(batch: int, context: int) -> list[int]:
    """The contexts of a decode grid point: spread evenly over (0, 2·context), mean
    ``context``. A served batch mixes requests at every stage of their output, and the
    CPU attention pads each group of sequences to its longest, so equal contexts would
    time a batch faster than any the node really runs (up to ~1.6x at B = 80)."""
    return [max(2, round(context * (2 * i + 1) / batch)) for i in range(batch)]


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
    threads: int = 1,
    grid: ProfileGrid | None = None,
    repeats: int = 5,
    dtype: str = "auto",
    num_blocks: int | None = None,
    progress: bool = True,
) -> ProfileResult:
    """Profile ``model`` on ``device`` at tensor-parallel degree ``tp`` with ``threads``
    torch CPU threads (at tp > 1: the real parallel engine, whose ranks share the
    machine's cores; docs/parallel.md)."""
    from disagg.engine.config import EngineConfig
    from disagg.engine.engine import make_worker
    from disagg.engine.kv_cache import KVCacheSpec

    if not isinstance(tp, int) or tp < 1:
        raise ConfigError("tp", f"must be an integer >= 1, got {tp!r}")
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


# -- command line ---------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny", help="Hugging Face model directory, or 'tiny'")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel degree: tp gloo/NCCL rank processes"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, as a node gets them (default 1: one per node on CPU)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks, as a node's")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds, not minutes)")
    p.add_argument(
        "--from-served",
        metavar="LOG",
        help="instead of timing the engine, refit --base on a served log (ServedRecorder's "
        "JSON, e.g. from bench.planner --calibrate) and measure handoff_s and ttft_overhead_s",
    )
    p.add_argument("--base", metavar="PROFILE", help="with --from-served: the profile to refit")
    p.add_argument(
        "--transfer-bandwidth",
        type=float,
        default=None,
        help="with --from-served: bytes/s the simulator charges a KV transfer, taken out of "
        "the measured hand-off (default: the cpu node's, 0.66e9)",
    )
    p.add_argument("-o", "--output", required=True, help="profile JSON to write")


QUICK_GRID = dict(
    prefill_batches=(1, 4),
    prefill_lens=(16, 128, 512),
    decode_batches=(1, 8, 32),
    decode_contexts=(64, 512),
)


def run_profile(args) -> int:
    from disagg.sim.latency import save_profile

    if args.from_served:
        return _run_from_served(args)
    grid = None
    if args.quick:
        grid = ProfileGrid.product(**QUICK_GRID)
    result = profile_engine(
        args.model,
        args.device,
        tp=args.tp,
        threads=args.threads,
        grid=grid,
        repeats=args.repeats,
        dtype=args.dtype,
        num_blocks=args.num_blocks,
    )
    save_profile(result.profile, args.output)
    print(result.summary())
    print(f"profile written to {args.output}")
    return 0


def _run_from_served(args) -> int:
    from disagg.planner.presets import CPU_NODE
    from disagg.planner.served import calibrate, load_served_log
    from disagg.sim.latency import load_profile, save_profile

    if not args.base:
        raise ConfigError("--base", "--from-served refits a profile: name it with --base")
    bandwidth = args.transfer_bandwidth or CPU_NODE.intra_node_bandwidth
    result = calibrate(load_profile(args.base), load_served_log(args.from_served), bandwidth)
    save_profile(result.profile, args.output)
    print(result.summary())
    print(f"profile written to {args.output}")
    return 0
