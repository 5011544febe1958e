"""Workloads for the simulator: which client sends which request, and when.

A workload comes from a JSON spec (one synthetic arrival process per client) or from a
JSONL trace. The format, every field and the presets are in ``docs/workloads.md``.
Generation is deterministic: each client draws from its own RNG streams, spawned from
``(seed, client index)``, so appending a client leaves the others' arrivals unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from disagg.config_errors import config_error, short_repr
from disagg.errors import ConfigError

ARRIVALS = ("poisson", "uniform", "gamma", "on_off", "ramp")
DISTS = ("uniform", "lognormal", "normal")
TRACE_KEYS = ("time", "client_id", "prompt_len", "output_len")
# Refuse a spec that would build more than this many arrivals for one client: a rate typo
# (1e6 for 1.6) should be an error, not an exhausted machine.
MAX_ARRIVALS_PER_CLIENT = 10_000_000
# Sampled lengths are clipped into [1, MAX_LENGTH]; a lognormal tail can exceed int64.
MAX_LENGTH = 2**31 - 1
# Fields that only one arrival process reads; required there, an error elsewhere.
_ONLY_FOR = {"cv": "gamma", "period": "on_off", "rate_end": "ramp"}


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request: when it arrives (seconds), from whom, its prompt and output lengths."""

    time: float
    client_id: str
    prompt_len: int
    output_len: int


@dataclass
class Workload:
    """``arrivals`` sorted by time, ties in client order. ``client_ids`` is in spec order
    (a trace's: order of first appearance) and includes clients that sent nothing;
    ``weights`` has an entry for every client."""

    duration: float
    arrivals: list[Arrival]
    weights: dict[str, float]
    client_ids: list[str]


# -- the spec's schema ---------------------------------------------------------------


class _Edge(BaseModel):
    # strict: "1.5" is not a rate and 256.0 is not a length.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class _Spec(_Edge):
    duration: float | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)
    clients: list[Any] | None = None
    trace: str | None = Field(None, min_length=1)
    weights: dict[str, Annotated[float, Field(gt=0)]] | None = None


class _Client(_Edge):
    id: str = Field(min_length=1)
    arrival: str
    rate: float = Field(gt=0)
    input_len: Any
    output_len: Any
    weight: float = Field(1.0, gt=0)
    start: float = Field(0.0, ge=0)
    end: float | None = Field(None, gt=0)
    cv: float | None = Field(None, gt=0, le=100)  # cv² must not overflow; 100 is absurd already
    period: float | None = Field(None, gt=0)
    rate_end: float | None = Field(None, ge=0)


class _Length(_Edge):
    dist: str
    min: int | None = Field(None, ge=1, le=MAX_LENGTH)
    max: int | None = Field(None, ge=1, le=MAX_LENGTH)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raise NotImplementedError


class _UniformLength(_Length):
    low: int = Field(ge=1, le=MAX_LENGTH)
    high: int = Field(ge=1, le=MAX_LENGTH)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size=n, endpoint=True)


class _LognormalLength(_Length):
    sigma: float = Field(ge=0)
    mean: float | None = None  # of the underlying normal (numpy's ``mean``)
    median: float | None = Field(None, gt=0)  # exp(mean): the same thing, in tokens

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = self.mean if self.mean is not None else math.log(self.median)
        return rng.lognormal(mu, self.sigma, size=n)


class _NormalLength(_Length):
    mean: float
    std: float = Field(ge=0)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.normal(self.mean, self.std, size=n)


_LENGTHS: dict[str, type[_Length]] = {
    "uniform": _UniformLength,
    "lognormal": _LognormalLength,
    "normal": _NormalLength,
}


@dataclass(frozen=True, slots=True)
class _Plan:
    client: _Client
    input_len: int | _Length
    output_len: int | _Length


# -- validation -----------------------------------------------------------------------


def _validate(model: type[BaseModel], data: Any, where: str) -> Any:
    """``model.model_validate(data)``, with pydantic's first error as a ConfigError whose
    field is ``where`` joined with the error's location. An unknown field is reported
    before anything else: a misspelt key also shows up as a missing one."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise config_error(e, where=where, model=model) from None


def _length(value: Any, where: str) -> int | _Length:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_LENGTH:
            raise ConfigError(where, f"must be in [1, {MAX_LENGTH}], got {value}")
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            where, f"must be an integer or an object with 'dist', got {short_repr(value)}"
        )
    dist = value.get("dist")
    if not isinstance(dist, str) or dist not in _LENGTHS:
        got = "nothing" if dist is None else short_repr(dist)
        raise ConfigError(f"{where}.dist", f"must be one of {', '.join(DISTS)}; got {got}")
    spec = _validate(_LENGTHS[dist], value, where)
    if isinstance(spec, _UniformLength) and spec.high < spec.low:
        raise ConfigError(f"{where}.high", f"must be >= low ({spec.low}), got {spec.high}")
    if isinstance(spec, _LognormalLength) and (spec.mean is None) == (spec.median is None):
        raise ConfigError(f"{where}.median", "give exactly one of 'median' and 'mean'")
    if spec.min is not None and spec.max is not None and spec.max < spec.min:
        raise ConfigError(f"{where}.max", f"must be >= min ({spec.min}), got {spec.max}")
    return spec


def _plan(raw: Any, where: str, duration: float) -> _Plan:
    c: _Client = _validate(_Client, raw, where)
    if c.arrival not in ARRIVALS:
        raise ConfigError(
            f"{where}.arrival", f"must be one of {', '.join(ARRIVALS)}; got {c.arrival!r}"
        )
    for name, owner in _ONLY_FOR.items():
        given = getattr(c, name) is not None
        if c.arrival == owner and not given:
            raise ConfigError(f"{where}.{name}", f"required for arrival {owner!r}")
        if c.arrival != owner and given:
            raise ConfigError(f"{where}.{name}", f"only used by arrival {owner!r}; remove it")
    if c.end is not None and c.end <= c.start:
        raise ConfigError(f"{where}.end", f"must be > start ({c.start}), got {c.end}")
    if c.start >= duration:
        raise ConfigError(f"{where}.start", f"must be < duration ({duration}), got {c.start}")
    peak = max(c.rate, c.rate_end or 0.0)
    if peak * (min(c.end or duration, duration) - c.start) > MAX_ARRIVALS_PER_CLIENT:
        raise ConfigError(
            f"{where}.rate", f"would make over {MAX_ARRIVALS_PER_CLIENT:,} arrivals; lower it"
        )
    inp = _length(c.input_len, f"{where}.input_len")
    return _Plan(c, inp, _length(c.output_len, f"{where}.output_len"))


# -- generation -----------------------------------------------------------------------


def _poisson(rng: np.random.Generator, rate: float, t0: float, t1: float) -> np.ndarray:
    # Given its count, a Poisson process's points are i.i.d. uniform on the window.
    n = rng.poisson(rate * (t1 - t0))
    return np.sort(rng.uniform(t0, t1, n))


def _gamma(rng: np.random.Generator, rate: float, cv: float, t0: float, t1: float) -> np.ndarray:
    # A renewal process started at t0: the first arrival is one gap after it.
    shape, scale = 1.0 / cv**2, cv**2 / rate  # mean gap 1/rate, std/mean = cv
    chunks, t = [], t0
    while t < t1:
        gaps = rng.gamma(shape, scale, int(rate * (t1 - t) * 1.1) + 64)
        chunks.append(t + np.cumsum(gaps))
        t = chunks[-1][-1]
    return np.concatenate(chunks)


def _on_off(
    rng: np.random.Generator, rate: float, period: float, t0: float, t1: float
) -> np.ndarray:
    # Poisson over the total on-time, then each point u is moved past the off windows
    # before it: on window k is [t0 + 2k·period, t0 + (2k+1)·period).
    cycles, rest = divmod(t1 - t0, 2 * period)
    u = _poisson(rng, rate, 0.0, cycles * period + min(rest, period))
    offset = np.fmod(u, period)
    return t0 + 2 * period * np.rint((u - offset) / period) + offset


def _ramp(
    rng: np.random.Generator, r0: float, r1: float, length: float, t0: float, t1: float
) -> np.ndarray:
    # Rate r0 + (r1 - r0)·s/length at s = t - t0, so Λ(s) = r0·s + a·s² with the `a` below.
    # A unit-rate Poisson process on [0, Λ(t1 - t0)) mapped through Λ⁻¹ has this rate;
    # Λ⁻¹(u) = 2u / (r0 + sqrt(r0² + 4au)) is the root that does not cancel when a ≈ 0.
    a = (r1 - r0) / (2 * length)
    span = t1 - t0
    u = _poisson(rng, 1.0, 0.0, r0 * span + a * span**2)
    return t0 + 2 * u / (r0 + np.sqrt(np.maximum(r0**2 + 4 * a * u, 0.0)))


def _arrival_times(c: _Client, rng: np.random.Generator, duration: float) -> np.ndarray:
    end = c.end if c.end is not None else duration
    t0, t1 = c.start, min(end, duration)
    if c.arrival == "poisson":
        times = _poisson(rng, c.rate, t0, t1)
    elif c.arrival == "uniform":
        times = t0 + np.arange(math.ceil((t1 - t0) * c.rate) + 1) / c.rate
    elif c.arrival == "gamma":
        times = _gamma(rng, c.rate, c.cv, t0, t1)
    elif c.arrival == "on_off":
        times = _on_off(rng, c.rate, c.period, t0, t1)
    else:
        times = _ramp(rng, c.rate, c.rate_end, end - t0, t0, t1)
    # Rounding may put a point on t1; the window is half-open.
    return times[(times >= t0) & (times < t1)]


def _lengths(spec: int | _Length, rng: np.random.Generator, n: int) -> np.ndarray:
    if isinstance(spec, int):
        return np.full(n, spec, dtype=np.int64)
    lo, hi = spec.min or 1, min(spec.max or MAX_LENGTH, MAX_LENGTH)
    return np.clip(np.rint(spec.draw(rng, n)), lo, hi).astype(np.int64)


def _generate(plans: list[_Plan], duration: float, seed: int) -> list[Arrival]:
    times, owners, prompts, outputs = [], [], [], []
    streams = np.random.SeedSequence(seed).spawn(len(plans))  # stream i depends on (seed, i)
    for i, (plan, stream) in enumerate(zip(plans, streams, strict=True)):
        # Separate streams, so changing a length distribution leaves the times alone.
        t_rng, in_rng, out_rng = (np.random.default_rng(s) for s in stream.spawn(3))
        t = _arrival_times(plan.client, t_rng, duration)
        times.append(t)
        owners.append(np.full(len(t), i, dtype=np.int64))
        prompts.append(_lengths(plan.input_len, in_rng, len(t)))
        outputs.append(_lengths(plan.output_len, out_rng, len(t)))
    return _arrivals(
        np.concatenate(times),
        np.concatenate(owners),
        [p.client.id for p in plans],
        np.concatenate(prompts),
        np.concatenate(outputs),
    )


def _arrivals(
    t: np.ndarray, owner: np.ndarray, ids: list[str], prompt: np.ndarray, output: np.ndarray
) -> list[Arrival]:
    order = np.lexsort((owner, t))  # by time, then client order; stable
    names = np.array(ids, dtype=object)[owner[order]].tolist()
    return list(
        map(Arrival, t[order].tolist(), names, prompt[order].tolist(), output[order].tolist())
    )


# -- public entry points ---------------------------------------------------------------


def workload_from_spec(spec: dict, base_dir: Path | None = None) -> Workload:
    """Build a workload from a parsed JSON spec. A ``trace`` path is taken relative to
    ``base_dir`` (default: the working directory)."""
    if not isinstance(spec, dict):
        raise ConfigError("spec", f"must be a JSON object, got {type(spec).__name__}")
    s: _Spec = _validate(_Spec, spec, "")
    if s.trace is not None:
        return _from_trace_spec(s, base_dir)
    if s.weights is not None:
        raise ConfigError("weights", "only goes with 'trace'; give each client a 'weight'")
    if s.clients is None:
        raise ConfigError("clients", "required (or give 'trace')")
    if not s.clients:
        raise ConfigError("clients", "must list at least one client")
    if s.duration is None:
        raise ConfigError("duration", "required")
    plans = [_plan(raw, f"clients[{i}]", s.duration) for i, raw in enumerate(s.clients)]
    first: dict[str, int] = {}
    for i, p in enumerate(plans):
        j = first.setdefault(p.client.id, i)
        if j != i:
            raise ConfigError(
                f"clients[{i}].id", f"duplicate client id {p.client.id!r} (clients[{j}])"
            )
    return Workload(
        duration=s.duration,
        arrivals=_generate(plans, s.duration, s.seed),
        weights={p.client.id: p.client.weight for p in plans},
        client_ids=[p.client.id for p in plans],
    )


def _from_trace_spec(s: _Spec, base_dir: Path | None) -> Workload:
    if s.clients is not None:
        raise ConfigError("clients", "give either 'clients' or 'trace', not both")
    if "seed" in s.model_fields_set:
        raise ConfigError("seed", "has no effect on a trace; remove it")
    path = Path(s.trace)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    workload = load_trace(path, s.duration)
    for client_id, weight in (s.weights or {}).items():
        if client_id not in workload.weights:
            raise ConfigError(f"weights.{client_id}", f"no client {client_id!r} in {path}")
        workload.weights[client_id] = weight
    return workload


def load_workload(path: str | Path) -> Workload:
    """A ``.jsonl`` file is a trace (see :func:`load_trace`); anything else a JSON spec."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_trace(path)
    text = _read(path)
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}:{e.lineno}", f"invalid JSON (column {e.colno}): {e.msg}"
        ) from None
    try:
        return workload_from_spec(spec, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(e.field, f"{e.reason} (in {path})") from None


def load_trace(path: str | Path, duration: float | None = None) -> Workload:
    """Replay a JSONL trace, one ``{"time", "client_id", "prompt_len", "output_len"}``
    object a line. ``duration`` defaults to the last arrival's time; arrivals after it
    are dropped. Every client's weight is 1."""
    path = Path(path)
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not (math.isfinite(duration) and duration > 0)
    ):
        raise ConfigError("duration", f"must be a number > 0, got {duration!r}")
    times: list[float] = []
    ints: list[tuple[int, int, int]] = []  # (client index, prompt_len, output_len)
    index: dict[str, int] = {}
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if line.strip():
            time, client_id, prompt_len, output_len = _trace_row(line, f"{path}:{lineno}")
            times.append(time)
            ints.append((index.setdefault(client_id, len(index)), prompt_len, output_len))
    if duration is None:
        duration = max(times, default=0.0)
        if duration <= 0:
            raise ConfigError("duration", f"{path} has no arrival after time 0; pass a duration")
    t = np.array(times, dtype=np.float64)
    cols = np.array(ints, dtype=np.int64).reshape(-1, 3)
    keep = t <= duration
    t, cols, ids = t[keep], cols[keep], list(index)
    arrivals = _arrivals(t, cols[:, 0], ids, cols[:, 1], cols[:, 2])
    return Workload(float(duration), arrivals, dict.fromkeys(ids, 1.0), ids)


def save_trace(workload: Workload, path: str | Path) -> None:
    """Write ``workload``'s arrivals as a JSONL trace that :func:`load_trace` reads back
    exactly (its duration is not stored; pass it to ``load_trace`` again)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for a in workload.arrivals:
            row = {"time": a.time, "client_id": a.client_id}
            row |= {"prompt_len": a.prompt_len, "output_len": a.output_len}
            f.write(json.dumps(row) + "\n")


def _trace_row(line: str, where: str) -> tuple[float, str, int, int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(where, f"invalid JSON (column {e.colno}): {e.msg}") from None
    if not isinstance(obj, dict):
        raise ConfigError(where, f"must be a JSON object, got {line.strip()[:40]!r}")
    for key in obj:
        if key not in TRACE_KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key; allowed: {', '.join(TRACE_KEYS)}")
    for key in TRACE_KEYS:
        if key not in obj:
            raise ConfigError(f"{where}.{key}", "missing")
    time, client_id = obj["time"], obj["client_id"]
    if isinstance(time, bool) or not isinstance(time, int | float) or not time >= 0:
        raise ConfigError(f"{where}.time", f"must be a number >= 0, got {time!r}")
    if not math.isfinite(time):
        raise ConfigError(f"{where}.time", f"must be finite, got {time!r}")
    if not isinstance(client_id, str) or not client_id:
        raise ConfigError(f"{where}.client_id", f"must be a non-empty string, got {client_id!r}")
    for key in ("prompt_len", "output_len"):
        n = obj[key]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LENGTH:
            raise ConfigError(
                f"{where}.{key}", f"must be an integer in [1, {MAX_LENGTH}], got {n!r}"
            )
    return float(time), client_id, obj["prompt_len"], obj["output_len"]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot read: {e}") from None
