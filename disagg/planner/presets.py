"""What the planner plans for: the model, the GPU and the workload, by preset or file.

GPUs and models are the simulator's presets (:mod:`disagg.sim.presets`, sources in
docs/latency-model.md); this module adds the workload presets and trace files, and
resolves a ``--model`` that is either a preset name or a Hugging Face ``config.json``.

A planning workload is a fixed sample of request lengths and of arrival gaps with mean
1 s; :meth:`PlanWorkload.at_rate` scales the gaps to a rate. Every rate the planner
tries therefore sees the same requests in the same order (common random numbers), so
attainment moves with the rate and not with sampling noise, and the search is
deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disagg.errors import ConfigError
from disagg.sim.presets import GPUS, MODELS, GpuSpec, ModelShape, gpu, model_shape
from disagg.sim.presets import model_shape_from_config as _from_config
from disagg.sim.workload import Arrival, Workload

PLAN_CLIENT = "plan"  # the one client of a planning workload


@dataclass(frozen=True)
class LengthSpec:
    """Lognormal token lengths: half below ``median``, spread ``sigma``, clipped to
    [low, high]; then ``prompt + output`` is capped at ``max_total`` by shortening the
    output (the model's context)."""

    median: float
    sigma: float
    low: int
    high: int


@dataclass(frozen=True)
class WorkloadPreset:
    name: str
    prompt: LengthSpec
    output: LengthSpec
    max_total: int
    source: str


# The three DistServe evaluation workloads (OSDI'24 §6.1: chatbot on ShareGPT, code
# completion on HumanEval, summarization on LongBench), as length distributions. DistServe
# keeps requests with prompt + output < 2048 tokens, OPT's context
# (evaluation/2-benchmark-serving/0-prepare-dataset.py); we cap at 2047 likewise.
WORKLOADS: dict[str, WorkloadPreset] = {
    "chatbot-like": WorkloadPreset(
        "chatbot-like",
        prompt=LengthSpec(median=200, sigma=1.0, low=4, high=2046),
        output=LengthSpec(median=250, sigma=0.8, low=4, high=2048),
        max_total=2047,
        source=(
            "ShareGPT-like; the same lognormals as bench/workloads/sharegpt_like.json "
            "(docs/workloads.md): prompt median 200 sigma 1.0, output median 250 sigma 0.8 "
            "(means ~330 / ~345 tokens); DistServe's prompt+output < 2048 filter"
        ),
    ),
    "code-completion-like": WorkloadPreset(
        "code-completion-like",
        prompt=LengthSpec(median=130, sigma=0.45, low=16, high=1024),
        output=LengthSpec(median=90, sigma=0.6, low=4, high=512),
        max_total=2047,
        source=(
            "HumanEval-like: 164 problems whose prompts (signature + docstring) run about "
            "60-400 tokens and whose canonical solutions about 20-300; median 130 / 90 "
            "tokens are our estimate from the dataset's character counts, not a tokenised "
            "measurement"
        ),
    ),
    "summarization-like": WorkloadPreset(
        "summarization-like",
        prompt=LengthSpec(median=1500, sigma=0.3, low=256, high=1900),
        output=LengthSpec(median=90, sigma=0.5, low=8, high=512),
        max_total=2047,
        source=(
            "LongBench-like: long documents cut to the 2048-token context DistServe serves "
            "OPT with, so prompts crowd below it (median 1500, sigma 0.3, at most 1900), "
            "short summaries (median 90); our estimate, not a tokenised measurement"
        ),
    ),
}


@dataclass(frozen=True)
class PlanWorkload:
    """Request lengths and arrival gaps (mean 1 s) to scale to any rate."""

    name: str
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    unit_gaps: tuple[float, ...]  # gaps between arrivals at 1 req/s; the first is 0's gap
    source: str

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def mean_prompt(self) -> float:
        return float(np.mean(self.prompt_lens))

    @property
    def mean_sq_prompt(self) -> float:
        return float(np.mean(np.square(np.asarray(self.prompt_lens, dtype=np.float64))))

    @property
    def mean_output(self) -> float:
        return float(np.mean(self.output_lens))

    @property
    def max_total(self) -> int:
        return max(p + o for p, o in zip(self.prompt_lens, self.output_lens, strict=True))

    def at_rate(self, rate: float, drain: float) -> Workload:
        """The requests arriving at ``rate`` req/s; the run lasts ``drain`` seconds past
        the last arrival, so every request that can still meet its SLOs finishes."""
        times = np.cumsum(np.asarray(self.unit_gaps)) / rate
        arrivals = [
            Arrival(float(t), PLAN_CLIENT, p, o)
            for t, p, o in zip(times, self.prompt_lens, self.output_lens, strict=True)
        ]
        return Workload(float(times[-1]) + drain, arrivals, {PLAN_CLIENT: 1.0}, [PLAN_CLIENT])


def _lognormal(rng: np.random.Generator, spec: LengthSpec, n: int) -> np.ndarray:
    draws = rng.lognormal(np.log(spec.median), spec.sigma, size=n)
    return np.clip(np.rint(draws), spec.low, spec.high).astype(np.int64)


def preset_workload(name: str, num_requests: int, seed: int = 0) -> PlanWorkload:
    try:
        preset = WORKLOADS[name]
    except KeyError:
        raise ConfigError(
            "workload",
            f"unknown workload {name!r}; known presets: {', '.join(WORKLOADS)}, "
            f"or a trace file (JSON list of {{prompt_len, output_len[, start_time]}})",
        ) from None
    rng = np.random.default_rng(seed)
    prompt = _lognormal(rng, preset.prompt, num_requests)
    output = _lognormal(rng, preset.output, num_requests)
    output = np.maximum(1, np.minimum(output, preset.max_total - prompt))
    gaps = rng.exponential(1.0, size=num_requests)  # Poisson arrivals
    return PlanWorkload(
        name,
        tuple(int(x) for x in prompt),
        tuple(int(x) for x in output),
        tuple(float(x) for x in gaps),
        preset.source,
    )


def trace_workload(path: str | Path, num_requests: int, seed: int = 0) -> PlanWorkload:
    """A JSON list of ``{"prompt_len", "output_len"[, "start_time"]}``. With start
    times (on every entry or none), the gaps between them keep their shape, scaled to
    mean 1 s; without, arrivals are Poisson. Traces longer than ``num_requests`` are
    cut to their first ``num_requests`` entries."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "workload", f"{path}: no such file, and not a preset ({', '.join(WORKLOADS)})"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"not valid JSON ({exc})") from exc
    if not isinstance(data, list) or not data:
        raise ConfigError(str(path), "must hold a non-empty JSON list of requests")
    data = data[:num_requests]
    prompts, outputs, starts = [], [], []
    for i, entry in enumerate(data):
        where = f"{path}:{i}"
        if not isinstance(entry, dict):
            raise ConfigError(where, "each request must be an object")
        extra = set(entry) - {"prompt_len", "output_len", "start_time"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}", "unknown field")
        for key in ("prompt_len", "output_len"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{key}", f"must be an integer >= 1, got {value!r}")
        prompts.append(entry["prompt_len"])
        outputs.append(entry["output_len"])
        if "start_time" in entry:
            t = entry["start_time"]
            if isinstance(t, bool) or not isinstance(t, int | float) or not t >= 0:
                raise ConfigError(f"{where}.start_time", f"must be a number >= 0, got {t!r}")
            starts.append(float(t))
    if starts and len(starts) != len(data):
        raise ConfigError(f"{path}", "give start_time on every request or on none")
    if starts:
        order = np.argsort(starts, kind="stable")
        prompts = [prompts[i] for i in order]
        outputs = [outputs[i] for i in order]
        t = np.sort(np.asarray(starts))
        gaps = np.diff(t, prepend=t[0])
        span = t[-1] - t[0]
        if len(t) < 2 or span <= 0:
            raise ConfigError(f"{path}", "start times must span a positive interval")
        gaps = gaps * (len(t) - 1) / span  # mean gap 1 s
        source = f"trace {path} ({len(t)} requests, its own arrival pattern)"
    else:
        gaps = np.random.default_rng(seed).exponential(1.0, size=len(prompts))
        source = f"trace {path} ({len(prompts)} requests, Poisson arrivals)"
    return PlanWorkload(
        path.stem,
        tuple(prompts),
        tuple(outputs),
        tuple(float(g) for g in gaps),
        source,
    )


def load_plan_workload(name_or_path: str, num_requests: int, seed: int = 0) -> PlanWorkload:
    if num_requests < 10:
        raise ConfigError("requests", f"must be >= 10 to judge attainment, got {num_requests}")
    if name_or_path in WORKLOADS:
        return preset_workload(name_or_path, num_requests, seed)
    if name_or_path.endswith(".json") or Path(name_or_path).exists():
        return trace_workload(name_or_path, num_requests, seed)
    return preset_workload(name_or_path, num_requests, seed)  # raises, listing presets


def resolve_model(name_or_config: str) -> ModelShape:
    """A preset name, ``tiny`` (the embedded model), a ``config.json`` or a model
    directory."""
    if name_or_config in MODELS:
        return model_shape(name_or_config)
    if name_or_config == "tiny":
        from disagg.engine.worker import resolve_model_dir

        return _from_config(resolve_model_dir("tiny"), name="tiny")
    path = Path(name_or_config)
    if name_or_config.endswith(".json") or path.is_dir():
        return _from_config(path, name=path.parent.name if path.is_file() else path.name)
    raise ConfigError(
        "model",
        f"unknown model {name_or_config!r}; known presets: {', '.join(MODELS)}, "
        f"or a Hugging Face config.json (or its directory)",
    )


# A CPU node as the planner sees it: one node process with one torch thread, on one core
# of this kind of machine. Its batch times and KV capacity must come from a profile
# (`disagg profile --device cpu`; check_request insists), so only the links matter:
# KV moves between node processes over gloo on loopback. The compute and memory
# figures are rough single-core measurements kept for completeness; no roofline is
# built from them.
CPU_NODE = GpuSpec(
    name="cpu",
    peak_flops=86e9,  # fp32 1024x1024 matmul, one torch thread, one AMD EPYC core
    hbm_bandwidth=15e9,  # one-thread tensor copy, 30 GB/s read + write
    memory_bytes=1 << 30,  # the engine's default CPU KV pool (DEFAULT_CPU_KV_MEMORY)
    # docs/kv-transfer.md: paged gloo transfers of the tiny model's 512-token KV over
    # loopback, median 0.66 GB/s; the same figure between "nodes", which share a host.
    intra_node_bandwidth=0.66e9,
    intra_node_latency=0.5e-3,  # the transfer header's ~0.5 ms round trip, same source
    inter_node_bandwidth=0.66e9,
)
HARDWARE = (*GPUS, CPU_NODE.name)


def resolve_gpu(name: str) -> GpuSpec:
    """A GPU preset, or ``cpu``: one CPU node process (needs a fitted profile)."""
    if name == CPU_NODE.name:
        return CPU_NODE
    if name not in GPUS:
        raise ConfigError("gpu", f"unknown GPU {name!r}; known: {', '.join(HARDWARE)}")
    return gpu(name)


__all__ = [
    "CPU_NODE",
    "GPUS",
    "HARDWARE",
    "MODELS",
    "WORKLOADS",
    "PlanWorkload",
    "load_plan_workload",
    "resolve_gpu",
    "resolve_model",
]
