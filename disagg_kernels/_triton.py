"""Optional Triton import: ``import disagg_kernels`` must work on machines without Triton.

Kernel modules define their ``@triton.jit`` functions under ``if HAS_TRITON:``. The
interpreter flag (``TRITON_INTERPRET``) is read by ``triton.jit`` at decoration time, so it
must be set before the first ``kernels`` import for Triton kernels to run on CPU.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs (e.g. macOS) have no Triton wheel.
    triton = None
    tl = None
    HAS_TRITON = False

# The spellings Triton itself accepts as true for boolean environment variables.
_TRUE = frozenset({"1", "true", "yes", "on", "y"})


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def dot_precision(dtype: object) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: IEEE for float32 (Triton's
    default runs float32 as TF32 on tensor cores: a 10-bit mantissa, far from the float32
    reference), the default otherwise (16-bit operands are exact on tensor cores)."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (``tl.arange`` extents must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()


__all__ = [
    "HAS_TRITON",
    "dot_precision",
    "interpreter_enabled",
    "next_power_of_2",
    "tl",
    "triton",
]
