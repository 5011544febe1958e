"""Fitting DistServe's latency form to timed batches (``disagg profile``, and the refit
on a served log in :mod:`disagg.planner.served`).

In milliseconds, prefill ``T = a + b·Σl + c·Σl²`` and decode ``T = a + b·Σctx + c·B`` are
fitted by non-negative least squares on *relative* error (each row divided by its
measured time, as DistServe's fit does, constrained to ≥ 0 so no batch is faster than a
smaller one); decode may be split in two pieces at a batch size, when that halves the
squared error. Pure numpy: nothing here runs the engine.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from disagg.sim.latency import TpProfile

# A two-piece decode fit is kept only when it at least halves the squared relative error.
SPLIT_GAIN = 0.5


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


def decode_contexts(batch: int, context: int) -> list[int]:
    """The contexts of a decode grid point: spread evenly over (0, 2·context), mean
    ``context``. A served batch mixes requests at every stage of their output, and the
    CPU attention pads each group of sequences to its longest, so equal contexts would
    time a batch faster than any the node really runs (up to ~1.6x at B = 80)."""
    return [max(2, round(context * (2 * i + 1) / batch)) for i in range(batch)]


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
