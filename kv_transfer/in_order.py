"""NCCL's ordering of point-to-point operations, enforced over gloo: a CPU test mode.

NCCL runs the operations a process posts to one peer on one stream, in posting order, for
both directions: an operation starts only when the previous one on that pair has
completed, and a send completes only once the peer's matching receive has started (and a
receive once the matching send has). Gloo does neither: it matches a pair's sends and
receives independently. So a protocol that waits for a message it posted a receive for
*before* its own send (a deadlock under NCCL) passes every test over gloo.

With ``KV_TRANSFER_NCCL_ORDER=1`` in the environment, ``PeerLinks`` posts every operation
of a gloo group through ``InOrderPoster``: one thread per peer runs the operations one
after the other, posting each to gloo only after the previous one completed. Gloo sends
wait for the peer's receive to be posted, and the peer posts it only when its own
previous operations are over, which is NCCL's rendezvous. The channel then also speaks
NCCL's message format (exact sizes, no opening message), so the NCCL code path runs on
CPU tensors. Tests run the transfer suites with and without it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

import torch
import torch.distributed as dist

ENV_VAR = "KV_TRANSFER_NCCL_ORDER"

Post = Callable[[torch.Tensor], dist.Work]  # post one gloo operation on this pair


def nccl_order_requested() -> bool:
    """Whether this process runs gloo groups in NCCL's order (read at each backend's
    construction, so tests can set it per test)."""
    return os.environ.get(ENV_VAR, "").strip() not in ("", "0")


class OrderedWork:
    """What ``InOrderPoster`` hands back: the ``dist.Work`` calls ``PeerLinks`` makes."""

    def __init__(self, future: Future[None]) -> None:
        self._future = future

    def is_completed(self) -> bool:
        return self._future.done()

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None else timeout.total_seconds()
        try:
            self._future.result(timeout=seconds)
        except FutureTimeout:
            raise RuntimeError(f"in-order operation timed out after {seconds} s") from None
        return True


class InOrderPoster:
    """One peer's operations, run one at a time in posting order on a thread of their own.

    An operation that fails fails every later one (an NCCL communicator with a failed
    operation is aborted). ``close`` stops the thread after what is queued; a thread
    stuck in a gloo wait ends with its group's timeout, or with the process (daemon)."""

    def __init__(self, name: str) -> None:
        self._ops: queue.SimpleQueue[tuple[Post, torch.Tensor, Future[None]] | None] = (
            queue.SimpleQueue()
        )
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, op: Post, tensor: torch.Tensor) -> OrderedWork:
        future: Future[None] = Future()
        self._ops.put((op, tensor, future))
        return OrderedWork(future)

    def close(self) -> None:
        self._ops.put(None)

    def _run(self) -> None:
        while (item := self._ops.get()) is not None:
            op, tensor, future = item
            if self._failed is not None:
                future.set_exception(RuntimeError(f"an earlier operation failed: {self._failed}"))
                continue
            try:
                op(tensor).wait()  # the group's own timeout bounds a peer that never answers
            except BaseException as e:  # handed to whoever waits on this operation
                self._failed = e
                future.set_exception(e)
            else:
                future.set_result(None)
