"""Per-request sampling settings, validated once when the request is made."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.errors import InvalidRequestError

# What torch.Generator.manual_seed accepts (a signed or unsigned 64-bit value).
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request's output.

    ``temperature == 0`` means greedy. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes sampling reproducible for this request alone: the same seed
    gives the same tokens whatever else shares the batch. Generation stops at the first
    of: ``max_tokens`` tokens, an end-of-sequence token (unless ``ignore_eos``), a token in
    ``stop_token_ids``, or a string in ``stop`` appearing in the text (the text is cut
    before it).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists (the natural thing to pass) or None, but store tuples: params are shared.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is None:
                value = ()
            elif isinstance(value, str) and name == "stop":
                value = (value,)
            try:
                value = tuple(value)
            except TypeError:
                raise InvalidRequestError(
                    name, f"must be a list, got {type(value).__name__}"
                ) from None
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(
                "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}"
            )
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k):
            raise InvalidRequestError(
                "top_k", f"must be an integer (<= 0 disables), got {self.top_k!r}"
            )
        if self.seed is not None and not (
            _is_int(self.seed) and _SEED_MIN <= self.seed <= _SEED_MAX
        ):
            raise InvalidRequestError(
                "seed",
                f"must be an integer in [{_SEED_MIN}, {_SEED_MAX}] or None, got {self.seed!r}",
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(
                    "stop", f"stop strings must be non-empty strings, got {s!r}"
                )
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise InvalidRequestError(
                    "stop_token_ids", f"token ids must be integers >= 0, got {t!r}"
                )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
