"""Per-peer CUDA streams for KV transfers, ordered against compute with events.

On the default stream a transfer's gathers, scatters and NCCL operations would queue
with the model's kernels: a decode step would wait behind a receive that waits for a
peer, a prefill step behind a send whose completion depends on the peer's progress, and
with two or more nodes of each kind those waits can form a cycle. So each backend runs
a peer's transfer on a stream of that peer's own: NCCL's stream waits on it when an
operation is posted, and ``Work.wait`` makes it wait for NCCL's.

Ordering against compute, which runs on the device's current stream:
- a send reads KV that compute wrote: its stream first waits for what compute has queued
  (``wait_stream`` records an event on the compute stream and waits on it, on the GPU);
- a receive writes blocks nobody reads yet (freshly allocated); before it returns it
  synchronises its own stream with the host, so the caller may hand the blocks to any
  stream (the next decode step). Neither blocks the compute stream.
Off CUDA this is all a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class TransferStreams:
    """One stream per peer on ``device``. ``cuda`` (tests) stands in for ``torch.cuda``:
    ``Stream(device)``, ``current_stream(device)``, ``stream(s)`` (a context)."""

    def __init__(self, device: torch.device, *, cuda: Any = None) -> None:
        self._device = device
        self._cuda = cuda if cuda is not None else torch.cuda
        self._enabled = cuda is not None or device.type == "cuda"
        self._streams: dict[int, Any] = {}

    def stream(self, peer: int) -> Any:
        """``peer``'s stream (made on first use)."""
        s = self._streams.get(peer)
        if s is None:
            s = self._streams[peer] = self._cuda.Stream(self._device)
        return s

    @contextmanager
    def use(self, peer: int, *, after_compute: bool) -> Iterator[None]:
        """Run the block on ``peer``'s stream; ``after_compute``: only after the work
        compute has queued so far (a send: the KV it reads)."""
        if not self._enabled:
            yield
            return
        s = self.stream(peer)
        if after_compute:
            s.wait_stream(self._cuda.current_stream(self._device))
        with self._cuda.stream(s):
            yield
