"""Which implementation a kernel call runs: Triton or the pure-torch reference.

The choice comes from, in order: ``set_kernel_backend`` / ``kernel_backend`` (process-wide
override), then the ``DISAGG_KERNEL_BACKEND`` environment variable (read at each call, so
setting it after import works), then ``"auto"``. ``"auto"`` picks Triton for CUDA tensors
when Triton is importable and torch otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

from disagg_kernels._triton import HAS_TRITON, interpreter_enabled

KernelBackend = Literal["auto", "triton", "torch"]
ResolvedBackend = Literal["triton", "torch"]

ENV_VAR = "DISAGG_KERNEL_BACKEND"
_ALLOWED: tuple[str, ...] = get_args(KernelBackend)

# None means "no override: use the environment variable".
_override: KernelBackend | None = None


def _validate(name: str, source: str) -> KernelBackend:
    if name not in _ALLOWED:
        raise ValueError(
            f"unknown kernel backend {name!r} (from {source}); allowed: {', '.join(_ALLOWED)}"
        )
    return name  # type: ignore[return-value]


def get_kernel_backend() -> KernelBackend:
    """The configured backend name (not yet resolved against a tensor)."""
    if _override is not None:
        return _override
    return _validate(os.environ.get(ENV_VAR, "auto").strip().lower(), f"${ENV_VAR}")


def set_kernel_backend(name: KernelBackend | None) -> None:
    """Override the backend for the whole process; ``None`` returns to the env default."""
    global _override
    _override = None if name is None else _validate(name, "set_kernel_backend")


@contextmanager
def kernel_backend(name: KernelBackend) -> Iterator[None]:
    """Use backend ``name`` inside the ``with`` block, then restore the previous override."""
    global _override
    previous = _override
    set_kernel_backend(name)
    try:
        yield
    finally:
        _override = previous


def resolve(tensor: torch.Tensor) -> ResolvedBackend:
    """The implementation to run for inputs living where ``tensor`` lives."""
    return resolve_device(tensor.device)


def resolve_device(device: torch.device) -> ResolvedBackend:
    """The implementation kernels on ``device`` run (what ``resolve`` says of its tensors)."""
    name = get_kernel_backend()
    if name == "torch":
        return "torch"
    is_cuda = device.type == "cuda"
    if name == "auto":
        return "triton" if is_cuda and HAS_TRITON else "torch"
    if not HAS_TRITON:
        raise RuntimeError("kernel backend 'triton' was requested but triton is not installed")
    if not is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"kernel backend 'triton' was requested for a {device.type} tensor; "
            "Triton runs on CPU only in its interpreter: set TRITON_INTERPRET=1 before "
            "importing disagg_kernels, or use backend 'torch'/'auto'"
        )
    return "triton"
