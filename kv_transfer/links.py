"""Point-to-point messages to the peers of one torch.distributed group, under deadlines.

Every wait gets what is left of its call's deadline. A failure becomes a typed error and
marks the peer broken, because neither backend can take back a posted operation: gloo
closes the connection to a peer whose wait timed out, and an NCCL communicator with an
unfinished operation must be aborted. Later calls for a broken peer fail at once with
``TransferChannelError`` until the group is rebuilt and a new backend made; a broken
NCCL pair group is aborted at once, so its stuck operations free the GPU instead of
waiting for the watchdog.

NCCL runs a pair's operations in posting order on one stream (``ordered``): the protocol
must post them in the order the peer matches them. ``KV_TRANSFER_NCCL_ORDER=1`` makes a
gloo group behave the same way (``kv_transfer.in_order``), so tests on CPU see ordering
bugs. An NCCL ``Work.wait`` only orders the current CUDA stream after the operation; it
does not block the host. Waits on NCCL work therefore poll ``is_completed`` against the
deadline, then order the stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.base import check_timeout
from kv_transfer.errors import InvalidTransferArgument, TransferChannelError, TransferTimeout
from kv_transfer.header import RequestId
from kv_transfer.in_order import InOrderPoster, Post, nccl_order_requested
from kv_transfer.pairs import PairGroup

# A wait that starts after the deadline still gets this long, so work that already
# finished is collected instead of being reported late.
_MIN_WAIT_S = 1e-3
# Polling an NCCL operation: first this often, doubling up to the cap (a KV message takes
# tens of microseconds to milliseconds; the cap bounds the host's lag behind the GPU).
_POLL_FIRST_S, _POLL_CAP_S = 2e-5, 5e-4


@dataclass(slots=True)
class Xfer:
    """One call in flight: what every wait and error needs."""

    request_id: RequestId
    peer: int
    timeout: float
    start: float  # time.perf_counter() at the call
    deadline: float  # time.monotonic() deadline


Group = dist.ProcessGroup | PairGroup | None


def group_backend_name(group: Group) -> str:
    """``"gloo"`` or ``"nccl"`` (or what torch calls the group's backend)."""
    if isinstance(group, PairGroup):
        return group.name
    return str(dist.get_backend(group))


class PeerLinks:
    """``isend``/``irecv``/``wait`` to the other ranks of ``group``: a registered process
    group (None: the default one) or a ``PairGroup`` (``kv_transfer.pairs``)."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self._pair = group if isinstance(group, PairGroup) else None
        if self._pair is not None:
            self.rank, self.world_size = self._pair.rank, 2
        else:
            if not dist.is_initialized():
                raise InvalidTransferArgument(
                    "group",
                    "torch.distributed is not initialised; call init_transfer_group first",
                )
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        self._broken: dict[int, str] = {}
        name = group_backend_name(group) if self._pair is not None or dist.is_initialized() else ""
        self._nccl = "nccl" in name
        # gloo in NCCL's order (tests): one poster per peer, one stream per pair in NCCL.
        emulate = not self._nccl and nccl_order_requested()
        self._posters: dict[int, InOrderPoster] | None = {} if emulate else None
        self.ordered = self._nccl or emulate

    def begin(self, request_id: RequestId, peer: int, timeout: float) -> Xfer:
        """Start a call with ``peer``: a usable peer and a deadline ``timeout`` s away."""
        timeout = check_timeout(timeout)
        if not isinstance(peer, int) or not 0 <= peer < self.world_size or peer == self.rank:
            raise InvalidTransferArgument(
                "peer",
                f"{peer!r} is not another rank of this {self.world_size}-rank group "
                f"(self: {self.rank})",
            )
        if peer in self._broken:
            raise TransferChannelError(peer, f"it broke earlier ({self._broken[peer]})")
        return Xfer(request_id, peer, timeout, time.perf_counter(), time.monotonic() + timeout)

    def mark_broken(self, peer: int, reason: str) -> None:
        if peer in self._broken:
            return
        self._broken[peer] = reason
        if self._pair is not None:  # NCCL: its unfinished operations must not linger
            self._pair.abort()

    def close(self) -> None:
        """Stop the in-order posters (if any); the group itself is its owner's."""
        for poster in (self._posters or {}).values():
            poster.close()

    def isend(self, tensor: torch.Tensor, x: Xfer) -> dist.Work:
        try:
            return self._post(self._send_op(x.peer), tensor, x.peer)
        except RuntimeError as e:
            raise self._failed(x, "send", e) from e

    def irecv(self, tensor: torch.Tensor, x: Xfer) -> dist.Work:
        try:
            return self._post(self._recv_op(x.peer), tensor, x.peer)
        except RuntimeError as e:
            raise self._failed(x, "receive", e) from e

    def _send_op(self, peer: int) -> Post:
        if self._pair is not None:
            pair = self._pair
            return lambda t: pair.send(t, peer)
        return lambda t: dist.isend(t, group=self._group, group_dst=peer)

    def _recv_op(self, peer: int) -> Post:
        if self._pair is not None:
            pair = self._pair
            return lambda t: pair.recv(t, peer)
        return lambda t: dist.irecv(t, group=self._group, group_src=peer)

    def _post(self, op: Post, tensor: torch.Tensor, peer: int) -> dist.Work:
        if self._posters is None:
            return op(tensor)
        poster = self._posters.get(peer)
        if poster is None:
            poster = self._posters[peer] = InOrderPoster(f"kv-in-order-{peer}")
        return poster.post(op, tensor)  # type: ignore[return-value]

    def wait(self, work: dist.Work, x: Xfer, stage: str) -> None:
        if self._nccl:
            self._poll(work, x, stage)
        remaining = max(x.deadline - time.monotonic(), _MIN_WAIT_S)
        try:
            finished = work.wait(timeout=timedelta(seconds=remaining))
        except RuntimeError as e:
            if time.monotonic() >= x.deadline or "timed out" in str(e).lower():
                self.mark_broken(x.peer, f"timed out waiting for the {stage}")
                raise TransferTimeout(x.request_id, x.peer, stage, x.timeout) from e
            raise self._failed(x, stage, e) from e
        if finished is False:  # backends that report a timeout instead of raising
            self.mark_broken(x.peer, f"timed out waiting for the {stage}")
            raise TransferTimeout(x.request_id, x.peer, stage, x.timeout)

    def _poll(self, work: dist.Work, x: Xfer, stage: str) -> None:
        """Block the host until an NCCL operation completed, or the deadline passed."""
        pause = _POLL_FIRST_S
        try:
            while not work.is_completed():
                if time.monotonic() >= x.deadline:
                    self.mark_broken(x.peer, f"timed out waiting for the {stage}")
                    raise TransferTimeout(x.request_id, x.peer, stage, x.timeout)
                time.sleep(pause)
                pause = min(2 * pause, _POLL_CAP_S)
        except RuntimeError as e:  # the operation failed (the communicator was aborted)
            raise self._failed(x, stage, e) from e

    def _failed(self, x: Xfer, stage: str, error: RuntimeError) -> TransferChannelError:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        self.mark_broken(x.peer, f"{stage} failed: {first_line}")
        return TransferChannelError(x.peer, self._broken[x.peer])
