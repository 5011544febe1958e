"""What a request's service costs: h(n_in, n_out), charged as it is delivered.

Input cost is charged when a prompt is admitted, h(n_in, 0); output cost per generated
token as the increment h(n_in, k) - h(n_in, k - 1), so the total over a request is
exactly h(n_in, n_out) however its tokens are batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from disagg.errors import ConfigError


class ServiceCost(Protocol):
    def __call__(self, n_in: int, n_out: int) -> float: ...


@dataclass(frozen=True, slots=True)
class LinearCost:
    """h = w_in·n_in + w_out·n_out (VTC's default: w_in = 1, w_out = 2)."""

    w_in: float = 1.0
    w_out: float = 2.0

    def __post_init__(self) -> None:
        for name in ("w_in", "w_out"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)!r}")

    def __call__(self, n_in: int, n_out: int) -> float:
        return self.w_in * n_in + self.w_out * n_out


@dataclass(frozen=True, slots=True)
class QuadraticCost:
    """h = a·n_in + b·n_out + c·n_in·n_out + d·n_out², e.g. fitted to measured batch
    times (VTC §4.3). Non-negative coefficients keep h monotone in both arguments."""

    a: float = 1.0
    b: float = 2.0
    c: float = 0.0
    d: float = 0.0

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d"):
            if not getattr(self, name) >= 0:
                raise ConfigError(
                    name, f"must be >= 0 so the cost is monotone, got {getattr(self, name)!r}"
                )

    def __call__(self, n_in: int, n_out: int) -> float:
        return self.a * n_in + self.b * n_out + self.c * n_in * n_out + self.d * n_out * n_out


def input_charge(cost: ServiceCost, n_in: int) -> float:
    return cost(n_in, 0)


def output_charge(cost: ServiceCost, n_in: int, produced_before: int, n_new: int) -> float:
    return cost(n_in, produced_before + n_new) - cost(n_in, produced_before)
