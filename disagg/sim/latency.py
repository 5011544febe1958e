"""How long one batch takes on one instance, and how long KV takes to move.

Three parts, one interface (:class:`LatencyModel`):

- :class:`FittedLatency`: DistServe's fitted functional form, coefficients per
  tensor-parallel degree read from a JSON profile (:func:`load_profile`).
- :class:`AnalyticLatency`: a roofline from a :class:`ModelShape` and a :class:`GpuSpec`.
- :func:`transfer_time`: KV-cache transfer between instances.

The simulator and the placement planner call these millions of times, so the
per-call path is plain float arithmetic over constants computed once in ``__init__``.
``docs/latency-model.md`` derives every formula and lists every source.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from disagg.config_errors import config_error
from disagg.errors import ConfigError
from disagg.sim.presets import GpuSpec, ModelShape

GiB = 1 << 30

# Roofline efficiency defaults (docs/latency-model.md, "Efficiency factors"): DistServe's
# own OPT-13B/A100 fit implies ~0.59 of peak FLOP/s over a whole 512-token prefill and
# ~0.63 of HBM bandwidth for decode; gpt-fast measures 1,397 GB/s (0.69 of 2,039) for
# Llama-2-7B batch-1 decode on an A100-80GB.
DEFAULT_MFU = 0.6
DEFAULT_MBU = 0.7
# Share of GPU memory the engine may use (vLLM's gpu_memory_utilization default), and
# the activation reserve taken out of it (DistServe's profile_memory.py: 1% of memory).
DEFAULT_MEMORY_UTILIZATION = 0.9
DEFAULT_ACTIVATION_RESERVE_FRACTION = 0.01
# Fixed cost of one KV transfer (control round trip, NCCL send/recv launch): an
# assumption of its order, not a measurement.
KV_TRANSFER_LATENCY_S = 1e-4

_UNBOUNDED = sys.maxsize


@runtime_checkable
class LatencyModel(Protocol):
    """Batch times of ONE instance: one model replica on ``tp * pp`` GPUs.

    ``prefill_time``: one batch of prompts with Σl = ``num_tokens`` and
    Σl² = ``sum_sq_tokens``. ``decode_time``: one step of ``batch_size`` sequences whose
    contexts (prompt + tokens so far, the token fed this step included) sum to
    ``total_context``. Both in seconds; batches hold at least one request.

    Pipeline parallelism follows DistServe's simulator: the whole model's batch time is
    divided by ``pp``. That is the interval between batches leaving a FULL pipeline
    (throughput); it ignores fill/drain bubbles and is not the latency of one batch,
    which passes every stage in turn and takes ``pp`` times as long. A simulator that
    serves an instance as a single server with this time gets throughput right but
    reports TTFT short by ``(pp - 1) / pp`` of each prefill: multiply by ``pp`` (or
    chain ``pp`` stage servers, as DistServe does) for the latency of a lone batch.
    """

    @property
    def tp(self) -> int: ...
    @property
    def pp(self) -> int: ...
    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes of one token, whole model (what a transfer moves)."""
        ...

    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens the instance holds across all its GPUs."""
        ...

    def prefill_time(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> float: ...
    def decode_time(self, batch_size: int, total_context: int) -> float: ...


def transfer_time(
    num_tokens: int,
    kv_bytes_per_token: int,
    bandwidth_bytes_per_s: float,
    latency_s: float = KV_TRANSFER_LATENCY_S,
) -> float:
    """Seconds to move ``num_tokens`` of KV between instances.

    ``bandwidth_bytes_per_s`` is the aggregate between the two instances: when each of
    a tp-way instance's GPUs sends its shard over its own link, that is tp times one
    link (GpuSpec.inter_node_bandwidth or intra_node_bandwidth).
    """
    if not bandwidth_bytes_per_s > 0:
        raise ConfigError("bandwidth_bytes_per_s", f"must be > 0, got {bandwidth_bytes_per_s!r}")
    return latency_s + num_tokens * kv_bytes_per_token / bandwidth_bytes_per_s


# --- Fitted model ---------------------------------------------------------------------


class FittedLatency:
    """DistServe's fitted form for one (tp, pp); coefficients in milliseconds.

    prefill ``T = a + b·Σl + c·Σl²``; decode ``T = a + b·Σctx + c·B`` with (a, b, c) from
    the first piece whose ``max_batch`` (None: unbounded) is ≥ B. Returned in seconds,
    divided by ``pp`` (see :class:`LatencyModel`).
    """

    __slots__ = ("_decode", "_prefill", "kv_bytes_per_token", "kv_capacity_tokens", "pp", "tp")

    def __init__(
        self,
        *,
        tp: int,
        pp: int,
        prefill: Sequence[float],
        decode: Sequence[tuple[int | None, Sequence[float]]],
        kv_bytes_per_token: int,
        kv_capacity_tokens: int,
    ) -> None:
        if pp < 1:
            raise ConfigError("pp", f"must be >= 1, got {pp}")
        if not decode or decode[-1][0] is not None:
            raise ConfigError("decode", "the last piece must have max_batch None (unbounded)")
        scale = 1e-3 / pp  # ms -> s, then the pipeline convention
        a, b, c = prefill
        self._prefill = (a * scale, b * scale, c * scale)
        self._decode = tuple(
            (_UNBOUNDED if max_batch is None else max_batch, a * scale, b * scale, c * scale)
            for max_batch, (a, b, c) in decode
        )
        self.tp = tp
        self.pp = pp
        self.kv_bytes_per_token = kv_bytes_per_token
        self.kv_capacity_tokens = kv_capacity_tokens

    def prefill_time(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> float:
        a, b, c = self._prefill
        return a + b * num_tokens + c * sum_sq_tokens

    def decode_time(self, batch_size: int, total_context: int) -> float:
        for piece in self._decode:  # the last piece is unbounded, so the loop always breaks
            if batch_size <= piece[0]:
                break
        _, a, b, c = piece
        return a + b * total_context + c * batch_size

    def __repr__(self) -> str:
        return (
            f"FittedLatency(tp={self.tp}, pp={self.pp}, "
            f"kv_capacity_tokens={self.kv_capacity_tokens})"
        )


def _degree(key: str) -> str:
    if not key.isdigit() or int(key) < 1:
        raise ValueError(f"must be a positive integer degree such as '2', got {key!r}")
    return str(int(key))


_Degree = Annotated[str, AfterValidator(_degree)]
_Coefficient = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# [a, b, c]; non-negative, else some batch would take less time than a smaller one.
_Coefficients = Annotated[list[_Coefficient], Field(min_length=3, max_length=3)]
_Positive = Annotated[int, Field(ge=1)]


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DecodePiece(_FileModel):
    max_batch: _Positive | None  # the largest batch these coefficients serve; None: no bound
    coef: _Coefficients


class TpProfile(_FileModel):
    """Everything measured at one tensor-parallel degree."""

    prefill: _Coefficients
    decode: Annotated[list[DecodePiece], Field(min_length=1)]
    kv_capacity_tokens: _Positive  # at pp = 1
    kv_capacity_tokens_by_pp: dict[_Degree, _Positive] = {}  # pp >= 2
    fit_error: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}

    @field_validator("decode")
    @classmethod
    def _pieces_cover_every_batch(cls, pieces: list[DecodePiece]) -> list[DecodePiece]:
        # Raised as ConfigError with a path relative to this field; config_error joins them.
        previous = 0
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if piece.max_batch is None and not last:
                raise ConfigError(f"[{i}].max_batch", "only the last piece may be null (unbounded)")
            if piece.max_batch is not None and last:
                raise ConfigError(
                    f"[{i}].max_batch",
                    "the last piece must be null (unbounded) so every batch size has coefficients",
                )
            if piece.max_batch is not None:
                if piece.max_batch <= previous:
                    raise ConfigError(
                        f"[{i}].max_batch", f"must exceed the previous piece's {previous}"
                    )
                previous = piece.max_batch
        return pieces

    @field_validator("kv_capacity_tokens_by_pp")
    @classmethod
    def _pp1_is_elsewhere(cls, by_pp: dict[str, int]) -> dict[str, int]:
        if "1" in by_pp:
            raise ConfigError("1", "pp=1 goes in kv_capacity_tokens; list pp >= 2 here")
        return by_pp


class LatencyProfile(_FileModel):
    """A fitted-latency profile file: DistServe's coefficients, or ``disagg profile``'s."""

    unit: Literal["ms"]
    model_name: str | None = None
    gpu: str | None = None
    kv_bytes_per_token: _Positive
    tp: Annotated[dict[_Degree, TpProfile], Field(min_length=1)]
    # Measured in service (``disagg profile --from-served``); None: not measured.
    # handoff_s: prefill end to the KV held by the decode instance, less the bytes over
    # the bandwidth; replaces a transfer's fixed latency (KV_TRANSFER_LATENCY_S).
    handoff_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    # ttft_overhead_s: fixed messaging in every TTFT that no batch time holds: the
    # request reaching an idle prefill node, and its first token coming back.
    ttft_overhead_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    # prefill_gap_s: a served prefill node's turnaround from one batch's end to the next
    # one's start when work was waiting.
    prefill_gap_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    # prefill_jitter: the standard deviation of ln(served batch time / fitted time).
    prefill_jitter: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    sources: dict[str, str] = {}  # what each number is and where it came from

    @property
    def tp_degrees(self) -> list[int]:
        return sorted(int(k) for k in self.tp)

    def model(self, tp: int, pp: int = 1) -> FittedLatency:
        """The latency model of an instance with this layout."""
        entry = self.tp.get(str(tp))
        if entry is None:
            known = ", ".join(map(str, self.tp_degrees))
            raise ConfigError("tp", f"no profile for tp={tp}; profiled degrees: {known}")
        if pp < 1:
            raise ConfigError("pp", f"must be >= 1, got {pp}")
        capacity = (
            entry.kv_capacity_tokens if pp == 1 else entry.kv_capacity_tokens_by_pp.get(str(pp))
        )
        if capacity is None:
            known = ", ".join(map(str, sorted([1, *map(int, entry.kv_capacity_tokens_by_pp)])))
            raise ConfigError(
                f"tp.{tp}.kv_capacity_tokens_by_pp",
                f"no KV capacity for tp={tp}, pp={pp}; profiled pp: {known}",
            )
        return FittedLatency(
            tp=tp,
            pp=pp,
            prefill=entry.prefill,
            decode=[(piece.max_batch, piece.coef) for piece in entry.decode],
            kv_bytes_per_token=self.kv_bytes_per_token,
            kv_capacity_tokens=capacity,
        )


def parse_profile(data: Any, source: str = "<profile>") -> LatencyProfile:
    """Validate a profile already parsed from JSON; errors name the field and ``source``."""
    try:
        return LatencyProfile.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, source=source, model=LatencyProfile) from None


def load_profile(path: str | Path) -> LatencyProfile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "no such latency profile file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"not valid JSON ({exc})") from exc
    return parse_profile(data, str(path))


def save_profile(profile: LatencyProfile, path: str | Path) -> None:
    """Write ``profile`` as JSON that :func:`load_profile` reads back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


# --- Analytic model -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RooflineTerms:
    """One batch's roofline, split up (all ÷ pp like the batch time itself)."""

    compute_s: float  # every op at peak·mfu FLOP/s, summed
    memory_s: float  # every op at hbm·mbu bytes/s, summed
    comm_s: float  # tensor-parallel all-reduces
    total_s: float  # Σ over ops of max(compute, memory), + comm: what *_time returns

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


class AnalyticLatency:
    """A roofline estimate for ``model`` on ``tp * pp`` of ``gpu``.

    Per layer, two ops each take max(FLOPs / (peak·mfu), bytes / (hbm·mbu)): the dense
    matmuls (weights read once per step, activations in and out) and attention (KV
    read and written); tp > 1 adds two ring all-reduces of the hidden states. The LM
    head runs once per step for one row per sequence. docs/latency-model.md has each term.
    """

    __slots__ = (
        "_ar_fixed_s",
        "_ar_token_s",
        "_attn_act_s",
        "_decode_attn_flop_s",
        "_dense_act_s",
        "_dense_flop_s",
        "_dense_weight_s",
        "_head_act_s",
        "_head_flop_s",
        "_head_weight_s",
        "_inv_pp",
        "_kv_s",
        "_layers",
        "_prefill_attn_flop_s",
        "gpu",
        "kv_bytes_per_token",
        "kv_capacity_tokens",
        "model",
        "pp",
        "tp",
        "weight_bytes_per_gpu",
        "why",
    )

    def __init__(
        self,
        model: ModelShape,
        gpu: GpuSpec,
        tp: int = 1,
        pp: int = 1,
        *,
        mfu: float = DEFAULT_MFU,
        mbu: float = DEFAULT_MBU,
        memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
        activation_reserve_bytes: float | None = None,
    ) -> None:
        _check_layout(model, tp, pp)
        for name, value in (("mfu", mfu), ("mbu", mbu), ("memory_utilization", memory_utilization)):
            if not 0 < value <= 1:
                raise ConfigError(name, f"must be in (0, 1], got {value!r}")
        reserve = (
            DEFAULT_ACTIVATION_RESERVE_FRACTION * gpu.memory_bytes
            if activation_reserve_bytes is None
            else activation_reserve_bytes
        )
        if reserve < 0:
            raise ConfigError("activation_reserve_bytes", f"must be >= 0, got {reserve!r}")
        self.model, self.gpu, self.tp, self.pp = model, gpu, tp, pp

        flops = gpu.peak_flops * mfu  # FLOP/s of one GPU
        bw = gpu.hbm_bandwidth * mbu  # bytes/s of one GPU
        h, q, kv, inter = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
        dt, vocab = model.dtype_bytes, model.vocab_size
        up = 2 if model.gated_mlp else 1  # matrices the MLP input feeds
        replicas = max(1, tp // model.num_kv_heads)  # KV heads are copied when tp exceeds them

        # Seconds on one GPU, per layer, per unit named on the right.
        self._dense_flop_s = 2 * model.layer_params / tp / flops  # per token
        self._dense_weight_s = model.layer_params * dt / tp / bw  # per step
        # Each matmul reads its input and writes its output once: qkv, o, up(+gate), down.
        # Column-parallel inputs and row-parallel outputs are whole (h) on every GPU.
        self._dense_act_s = dt * (4 * h + (2 * q + 2 * kv + (up + 1) * inter) / tp) / bw
        self._prefill_attn_flop_s = 2 * q / tp / flops  # per Σl²: QKᵀ and PV, causal half
        self._decode_attn_flop_s = 4 * q / tp / flops  # per context token: QKᵀ and PV
        self._kv_s = 2 * kv * replicas * dt / tp / bw  # per token of KV read or written
        self._attn_act_s = 2 * q * dt / tp / bw  # per token: Q in, attention output out
        self._head_flop_s = 2 * h * vocab / tp / flops  # per row of logits
        self._head_weight_s = h * vocab * dt / tp / bw  # per step
        self._head_act_s = dt * (h + vocab / tp) / bw  # per row
        # Ring all-reduce of M bytes on tp GPUs: 2(tp-1) steps, each moving M/tp and paying
        # one hop's latency. Two per layer (after attention, after the MLP), M = tokens·h·dt.
        steps = 2 * (tp - 1)
        self._ar_fixed_s = 2 * steps * gpu.intra_node_latency
        self._ar_token_s = 2 * steps / tp * h * dt / gpu.intra_node_bandwidth
        self._layers = model.num_layers
        self._inv_pp = 1 / pp

        # Memory: the fullest GPU decides, since every GPU holds the same share of each
        # token's KV. It holds its layers' weights and one vocab table (two when pp = 1
        # and the LM head is untied).
        tables = 2 if pp == 1 and not model.tie_word_embeddings else 1
        stage_layers = model.num_layers // pp
        self.weight_bytes_per_gpu = (
            dt * (stage_layers * model.layer_params + tables * vocab * h) / tp
        )
        kv_per_token_per_gpu = stage_layers * 2 * kv * replicas * dt / tp
        usable = gpu.memory_bytes * memory_utilization - reserve
        free = usable - self.weight_bytes_per_gpu
        self.kv_bytes_per_token = model.kv_bytes_per_token
        self.kv_capacity_tokens = max(0, int(free // kv_per_token_per_gpu))
        where = f"{model.name} on {tp * pp}x {gpu.name} (tp={tp}, pp={pp})"
        weights = f"{self.weight_bytes_per_gpu / GiB:.1f} GiB of weights per GPU"
        if self.kv_capacity_tokens > 0:
            self.why = (
                f"{where} fits: {weights}, {free / GiB:.1f} GiB left for "
                f"{self.kv_capacity_tokens} KV tokens"
            )
        else:
            self.why = (
                f"{where} does not fit: {weights}, but a GPU offers {usable / GiB:.1f} GiB "
                f"({memory_utilization:.0%} of {gpu.memory_bytes / GiB:.1f} GiB less a "
                f"{reserve / GiB:.1f} GiB activation reserve) and KV needs room for a token; "
                f"raise tp or pp"
            )

    @property
    def fits(self) -> bool:
        """Whether the weights fit with room for at least one KV token (``why`` says more)."""
        return self.kv_capacity_tokens > 0

    def prefill_time(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> float:
        return self._step(
            num_tokens, sum_sq_tokens * self._prefill_attn_flop_s, num_tokens, batch_size
        )

    def decode_time(self, batch_size: int, total_context: int) -> float:
        # Attention reads every context token's KV and writes the new tokens'.
        return self._step(
            batch_size,
            total_context * self._decode_attn_flop_s,
            total_context + batch_size,
            batch_size,
        )

    def prefill_terms(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> RooflineTerms:
        return self._terms(
            num_tokens, sum_sq_tokens * self._prefill_attn_flop_s, num_tokens, batch_size
        )

    def decode_terms(self, batch_size: int, total_context: int) -> RooflineTerms:
        return self._terms(
            batch_size,
            total_context * self._decode_attn_flop_s,
            total_context + batch_size,
            batch_size,
        )

    def _step(self, tokens: int, attn_flop_s: float, kv_tokens: int, rows: int) -> float:
        """Batch time: ``tokens`` through the dense layers, attention compute already in
        seconds, ``kv_tokens`` of KV moved per layer, ``rows`` of logits."""
        dense_c = tokens * self._dense_flop_s
        dense_m = self._dense_weight_s + tokens * self._dense_act_s
        attn_m = kv_tokens * self._kv_s + tokens * self._attn_act_s
        head_c = rows * self._head_flop_s
        head_m = self._head_weight_s + rows * self._head_act_s
        layer = (
            (dense_c if dense_c > dense_m else dense_m)
            + (attn_flop_s if attn_flop_s > attn_m else attn_m)
            + self._ar_fixed_s
            + tokens * self._ar_token_s
        )
        return (self._layers * layer + (head_c if head_c > head_m else head_m)) * self._inv_pp

    def _terms(self, tokens: int, attn_flop_s: float, kv_tokens: int, rows: int) -> RooflineTerms:
        layers, inv_pp = self._layers, self._inv_pp
        compute = layers * (tokens * self._dense_flop_s + attn_flop_s) + rows * self._head_flop_s
        memory = (
            layers
            * (
                self._dense_weight_s
                + tokens * self._dense_act_s
                + kv_tokens * self._kv_s
                + tokens * self._attn_act_s
            )
            + self._head_weight_s
            + rows * self._head_act_s
        )
        comm = layers * (self._ar_fixed_s + tokens * self._ar_token_s)
        return RooflineTerms(
            compute_s=compute * inv_pp,
            memory_s=memory * inv_pp,
            comm_s=comm * inv_pp,
            total_s=self._step(tokens, attn_flop_s, kv_tokens, rows),
        )

    def __repr__(self) -> str:
        return (
            f"AnalyticLatency({self.model.name!r}, {self.gpu.name!r}, tp={self.tp}, pp={self.pp}, "
            f"kv_capacity_tokens={self.kv_capacity_tokens})"
        )


def _check_layout(model: ModelShape, tp: int, pp: int) -> None:
    heads, kv_heads = model.num_heads, model.num_kv_heads
    valid_tp = [
        d
        for d in range(1, heads + 1)
        if heads % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)
    ]
    if tp not in valid_tp:
        raise ConfigError(
            "tp",
            f"{model.name} ({heads} heads, {kv_heads} KV heads) cannot be split {tp} ways; "
            f"valid tp: {', '.join(map(str, valid_tp))}",
        )
    valid_pp = [d for d in range(1, model.num_layers + 1) if model.num_layers % d == 0]
    if pp not in valid_pp:
        raise ConfigError(
            "pp",
            f"{model.name}'s {model.num_layers} layers cannot be split into {pp} equal stages; "
            f"valid pp: {', '.join(map(str, valid_pp))}",
        )
