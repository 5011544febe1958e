"""Calibrating a latency profile from service: what the served system's steps and
messages really take, as opposed to the engine timed alone (``disagg profile``).

Two parts:

- :class:`ServedRecorder` watches a running coordinator's node messages and keeps, per
  prefill batch, its tokens, Σl² and model time; per decode step, its batch size, Σctx
  and the time since the node's previous step; per request, when it arrived, when its
  prefill started and ended (node clock: the nodes share the host, and the monotonic
  clock is the host's) and when its first token reached the coordinator. ``log()``
  returns it as plain JSON (the *served log*).
- :func:`calibrate` refits a profile's prefill and decode coefficients on a served log
  and sets what service adds to them: ``handoff_s``, ``ttft_overhead_s``, the prefill
  node's turnaround between batches (``prefill_gap_s``) and the spread of its batch
  times around the fit (``prefill_jitter``) (docs/latency-model.md).

Why the step *period* and not the node's reported model time for decode: between two
steps a decode node sends tokens, takes pulls and admissions, and shares the core with
the other processes; the simulator has no such gap, so the time it must charge per step
is the period. Only steps whose previous step left sequences running count (the node
went straight on); a step after idleness has no period.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from disagg.errors import ConfigError
from disagg.planner.fit import Fit, Sample, fit_decode, fit_lines, nnls_relative
from disagg.sim.latency import DecodePiece, LatencyProfile

# Decode steps are binned by batch size and mean context (tokens per bin) and each bin's
# mean period kept: equal weight per bin keeps the common small batches from drowning the
# rare large ones, and the mean (not the median) because a TPOT is a sum of periods, the
# scheduler's hiccups included (the median ran 5-10 % under the mean here).
CONTEXT_BIN = 64
MIN_STEPS_PER_BIN = 3
MIN_BINS = 4


class ServedRecorder:
    """Records a coordinator's prefill batches, decode steps and request timings.

    ``attach`` adds it as the coordinator's node observer: it sees every message from a
    live node, with the time it arrived, before the coordinator handles it. Call from
    the thread that built the coordinator, before traffic; read ``log()`` after traffic
    stops."""

    def __init__(self) -> None:
        self.prefill: list[list[float]] = []  # [start, seconds, Σl, Σl², B]
        self.decode: list[list[Any]] = []  # [node, received, seconds, B, Σctx, continues]
        self.requests: dict[int, list[float]] = {}  # rid -> [arrived, start, end, first, len]
        self._events = None

    def attach(self, coordinator) -> ServedRecorder:
        from disagg.protocol.cluster import Prefilled, StepTokens

        self._events = coordinator.events
        requests = coordinator.requests

        def observe(node, msg, now: float) -> None:
            if isinstance(msg, Prefilled) and msg.results:
                lens = [requests[r.rid].num_prompt_tokens for r in msg.results if r.rid in requests]
                r0 = msg.results[0]
                self.prefill.append(
                    [r0.prefill_start, r0.prefill_s, sum(lens), sum(n * n for n in lens), len(lens)]
                )
                for r in msg.results:
                    t = requests.get(r.rid)
                    if t is not None:
                        end = r.prefill_start + r.prefill_s
                        self.requests[r.rid] = [
                            t.arrival_time, r.prefill_start, end, now, t.num_prompt_tokens
                        ]  # fmt: skip
            elif isinstance(msg, StepTokens) and msg.rids:
                context = 0
                for rid, index in zip(msg.rids, msg.indices, strict=True):  # fed: output[index - 1]
                    t = requests.get(rid)
                    context += index + (t.num_prompt_tokens if t is not None else 0)
                going_on = len(msg.finished) < len(set(msg.rids))
                self.decode.append(
                    [node.node_id, now, msg.step_s, len(msg.rids), context, going_on]
                )

        coordinator.add_node_observer(observe)
        return self

    def log(self) -> dict[str, Any]:
        """The served log: ``prefill``, ``decode`` and ``requests`` (each request also
        with ``transfer_end`` from the coordinator's events, or None)."""
        rows = []
        for rid, (arrived, start, end, first, prompt) in self.requests.items():
            rec = self._events.get(str(rid)) if self._events is not None else None
            transfer_end = rec.first("transfer_end") if rec is not None else None
            rows.append([arrived, start, end, first, prompt, transfer_end])
        return {"prefill": self.prefill, "decode": self.decode, "requests": rows}


@dataclass(frozen=True)
class Calibration:
    """What a served log measured, and the profile refitted on it."""

    profile: LatencyProfile
    prefill_fit: Fit
    decode_pieces: list[tuple[int | None, Fit]]
    prefill_batches: int
    decode_steps: int  # steps with a period
    decode_bins: int
    max_batch: int  # the largest decode batch seen
    model_share: float  # median of model time / period over decode steps
    dispatch_s: float
    return_s: float
    handoff_s: float
    handoffs: int
    prefill_gap_s: float | None  # None: no batch followed another with work waiting
    prefill_gaps: int
    prefill_jitter: float
    tp: str = "1"  # the tensor-parallel degree refitted

    def summary(self) -> str:
        p = self.profile.tp[self.tp]
        dec = [e for _, f in self.decode_pieces for e in f.errors]
        lines = [
            f"served: {self.prefill_batches} prefill batches, {self.decode_steps} decode steps "
            f"in {self.decode_bins} bins (B <= {self.max_batch}; model time median "
            f"{self.model_share:.0%} of a step's period), {self.handoffs} hand-offs",
            *fit_lines(p, self.prefill_fit, dec),
        ]
        lines.append(
            f"handoff_s {self.handoff_s * 1e3:.1f} ms; ttft_overhead_s "
            f"{(self.dispatch_s + self.return_s) * 1e3:.1f} ms (to an idle prefill node "
            f"{self.dispatch_s * 1e3:.1f}, first token back {self.return_s * 1e3:.1f})"
        )
        gap = (
            f"{self.prefill_gap_s * 1e3:.2f} ms (median of {self.prefill_gaps} back-to-back "
            f"batches)"
            if self.prefill_gap_s is not None
            else "not measured (no batch found work waiting)"
        )
        lines.append(
            f"prefill_gap_s {gap}; prefill_jitter {self.prefill_jitter:.3f} "
            f"(sd of ln(served / fitted batch time))"
        )
        return "\n".join(lines)


def calibrate(
    base: LatencyProfile, log: dict[str, Any], bandwidth: float, tp: str = "1"
) -> Calibration:
    """``base`` with prefill and decode refitted on ``log`` (a served log of one
    prefill and one decode node at tensor-parallel degree ``tp``), its ``handoff_s``
    and ``ttft_overhead_s`` measured there; KV capacity and bytes per token are kept.
    ``bandwidth``: bytes/s the simulator charges a transfer (taken out of hand-offs)."""
    if tp not in base.tp:
        raise ConfigError("tp", f"the base profile has no tp={tp}")
    prefill = [row for row in log.get("prefill", []) if row[1] > 0]
    if len(prefill) < 3:
        raise ConfigError(
            "served log", f"{len(prefill)} prefill batches; need at least 3 to fit 3 coefficients"
        )
    x = np.array([[1.0, row[2], row[3]] for row in prefill])
    ms = np.array([row[1] * 1e3 for row in prefill])
    coef = nnls_relative(x, ms)
    errors = [float(e) for e in np.abs(x @ coef - ms) / ms]
    prefill_fit = Fit((float(coef[0]), float(coef[1]), float(coef[2])), errors)
    # The fit is the batches' central time; the simulator draws each batch around it.
    prefill_jitter = float(np.std(np.log(ms / np.maximum(x @ coef, 1e-9))))

    periods, shares = _decode_periods(log.get("decode", []))
    bins: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    for batch, context, period in periods:
        bins[(batch, round(context / batch / CONTEXT_BIN))].append((context, period))
    samples = [
        Sample(
            batch,
            max(2, round(statistics.median(c for c, _ in steps) / batch)),
            statistics.fmean(p for _, p in steps) * 1e3,
        )
        for (batch, _), steps in sorted(bins.items())
        if len(steps) >= MIN_STEPS_PER_BIN
    ]
    if len(samples) < MIN_BINS or len({s.batch_size for s in samples}) < 3:
        raise ConfigError(
            "served log",
            f"{len(periods)} decode steps in {len(samples)} usable bins of "
            f"{len({s.batch_size for s in samples})} batch sizes; need {MIN_BINS} bins and "
            f"3 batch sizes (serve longer or at more rates)",
        )
    pieces = fit_decode(samples)

    requests = log.get("requests", [])
    runs = sorted((row[0], row[0] + row[1]) for row in prefill)
    dispatch = [start - arrived for arrived, start, *_ in requests if _idle(runs, arrived, start)]
    back = [first - end for _, _, end, first, *_ in requests]
    kv_bytes = base.kv_bytes_per_token
    handoffs = [
        row[5] - row[2] - row[4] * kv_bytes / bandwidth for row in requests if row[5] is not None
    ]
    if not requests or not handoffs:
        raise ConfigError(
            "served log", "no requests with a KV hand-off; serve a disaggregated plan"
        )
    gaps = _turnarounds(prefill, requests)
    prefill_gap_s = max(0.0, statistics.median(gaps)) if gaps else None
    dispatch_s = max(0.0, statistics.median(dispatch)) if dispatch else 0.0
    return_s = max(0.0, statistics.median(back))
    handoff_s = max(0.0, statistics.median(handoffs))

    entry = base.tp[tp]
    fit_error = dict(entry.fit_error)
    fit_error.update(
        served_prefill_median=prefill_fit.median_error,
        served_prefill_max=prefill_fit.max_error,
        served_decode_median=statistics.median(e for _, f in pieces for e in f.errors),
        served_decode_max=max(e for _, f in pieces for e in f.errors),
    )
    new_entry = entry.model_copy(
        update={
            "prefill": list(prefill_fit.coef),
            "decode": [DecodePiece(max_batch=cut, coef=list(f.coef)) for cut, f in pieces],
            "fit_error": fit_error,
        }
    )
    max_batch = max(b for b, _, _ in periods)
    sources = dict(base.sources)
    sources["served"] = (
        f"tp.{tp}.prefill and tp.{tp}.decode refitted on {len(prefill)} served prefill batches "
        f"(model time) and {len(periods)} decode step periods (B <= {max_batch}); handoff_s and "
        f"ttft_overhead_s medians over {len(requests)} served requests; prefill_gap_s the "
        f"median over {len(gaps)} back-to-back batches, prefill_jitter the sd of ln(served / "
        f"fitted) over the prefill batches"
    )
    profile = base.model_copy(
        update={
            "tp": {**base.tp, tp: new_entry},
            "handoff_s": handoff_s,
            "ttft_overhead_s": dispatch_s + return_s,
            "prefill_gap_s": prefill_gap_s,
            "prefill_jitter": prefill_jitter,
            "sources": sources,
        }
    )
    return Calibration(
        profile=profile,
        prefill_fit=prefill_fit,
        decode_pieces=pieces,
        prefill_batches=len(prefill),
        decode_steps=len(periods),
        decode_bins=len(samples),
        max_batch=max_batch,
        model_share=statistics.median(shares) if shares else float("nan"),
        dispatch_s=dispatch_s,
        return_s=return_s,
        handoff_s=handoff_s,
        handoffs=len(handoffs),
        prefill_gap_s=prefill_gap_s,
        prefill_gaps=len(gaps),
        prefill_jitter=prefill_jitter,
        tp=tp,
    )


def _decode_periods(rows: list[list[Any]]) -> tuple[list[tuple[int, int, float]], list[float]]:
    """(B, Σctx, seconds since the node's previous step) for each step that followed a
    step leaving sequences running; and each such step's model time / period."""
    by_node: dict[str, list[list[Any]]] = defaultdict(list)
    for row in rows:
        by_node[row[0]].append(row)
    periods, shares = [], []
    for steps in by_node.values():
        steps.sort(key=lambda row: row[1])
        for prev, row in itertools.pairwise(steps):
            period = row[1] - prev[1]
            if prev[5] and period > 0:
                periods.append((int(row[3]), int(row[4]), period))
                shares.append(min(1.0, row[2] / period))
    return periods, shares


def _turnarounds(prefill: list[list[float]], requests: list[list[Any]]) -> list[float]:
    """Seconds from a prefill batch's end to the next batch's start, for each next batch
    that had a request waiting when the previous one ended (so the node went straight
    on: the time between is its turnaround, not idleness)."""
    first_arrival: dict[float, float] = {}  # batch start -> its earliest arrival
    for arrived, start, *_ in requests:
        first_arrival[start] = min(first_arrival.get(start, arrived), arrived)
    batches = sorted(prefill)
    out = []
    for prev, nxt in itertools.pairwise(batches):
        end = prev[0] + prev[1]
        if first_arrival.get(nxt[0], end) < end and nxt[0] >= end:
            out.append(nxt[0] - end)
    return out


def _idle(runs: list[tuple[float, float]], arrived: float, start: float) -> bool:
    """Whether no prefill batch ran between ``arrived`` and ``start`` (other than the
    request's own, which starts at ``start``): its wait was messaging, not queueing."""
    return not any(s < start and e > arrived for s, e in runs)


def load_served_log(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the served log ({exc})") from exc
    if not isinstance(data, dict) or not {"prefill", "decode", "requests"} <= data.keys():
        raise ConfigError(str(path), "a served log has prefill, decode and requests")
    return data
