"""Attention and KV-cache kernels: a Triton kernel and a pure-torch reference for each.

Every public function dispatches per call (see ``disagg_kernels.backend``): Triton for CUDA
tensors, torch on CPU, unless overridden with ``set_kernel_backend``/``kernel_backend`` or
the ``DISAGG_KERNEL_BACKEND`` environment variable. This package imports nothing from the
rest of the project.
"""

from __future__ import annotations

from disagg_kernels.backend import (
    KernelBackend,
    get_kernel_backend,
    kernel_backend,
    resolve,
    set_kernel_backend,
)
from disagg_kernels.block_copy import gather_blocks, scatter_blocks
from disagg_kernels.paged_attention import paged_decode_attention
from disagg_kernels.prefill_attention import prefill_attention
from disagg_kernels.store_kvcache import store_kvcache

__all__ = [
    "KernelBackend",
    "gather_blocks",
    "get_kernel_backend",
    "kernel_backend",
    "paged_decode_attention",
    "prefill_attention",
    "resolve",
    "scatter_blocks",
    "set_kernel_backend",
    "store_kvcache",
]
