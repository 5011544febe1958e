"""Which CUDA device a thread works on, and whether decode may run as CUDA graphs.

CUDA's current device is per host thread, and every thread starts on device 0. A process
whose model lives on ``cuda:N`` (N != 0) must make N current in each thread that touches
CUDA: otherwise Triton launches, stream and event creation and graph capture happen on
device 0 with device-N tensors. ``make_current`` in the worker's thread, and
``device_thread_pool`` for the model thread and the KV-transfer threads, do that.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from disagg_kernels.backend import resolve_device


def resolve(device: torch.device | str) -> torch.device:
    """``device`` with an index: ``cuda`` is the current CUDA device (``CUDA_VISIBLE_DEVICES``
    already restricts what the process sees)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def make_current(device: torch.device | str) -> None:
    """Make ``device`` this thread's current CUDA device (nothing to do elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def device_thread_pool(device: torch.device | str, name: str) -> ThreadPoolExecutor:
    """One worker thread, on ``device`` from its start."""
    return ThreadPoolExecutor(
        1, thread_name_prefix=name, initializer=make_current, initargs=(torch.device(device),)
    )


def decode_graphs_refusal(device: torch.device | str, *, enforce_eager: bool) -> str | None:
    """Why decode must run eagerly here, or None when CUDA graphs can be captured.

    Capture records kernels without running them, so nothing inside may wait on the GPU:
    the pure-torch kernels do (``int(context_lens.max())``, a NaN check), so graphs need
    the Triton backend. CPU has no graphs."""
    device = torch.device(device)
    if enforce_eager:
        return "enforce_eager is set"
    if device.type != "cuda":
        return f"{device.type} has no CUDA graphs"
    backend = resolve_device(device)
    if backend != "triton":
        return (
            f"the {backend} kernel backend synchronises with the host inside attention, "
            "which graph capture forbids"
        )
    return None
