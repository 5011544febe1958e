"""torch.distributed point-to-point backend: one code path for gloo (CPU caches) and NCCL
(CUDA caches).

A message carries one layer, (2, n, *block_shape): K's n blocks then V's, or, when a layer
is smaller than ``MIN_MESSAGE_BYTES``, that many consecutive layers, so that a message's
fixed cost (a few thread wake-ups on each side) stays small next to its bytes. Both sides
derive the grouping from the header, which carries it. Over gloo, a transfer whose
layers fit in the opening message with the header (``OPENING_MESSAGE_BYTES``, 8 MiB)
sends them there and no layer message at all (``layers_per_message`` 0): on a CPU, one
message of a few MiB costs less than a pipeline's extra messages and round trips.

Pipelining, with ``pipeline_depth`` staging buffers (messages in flight) on each side:

    sender:   gather m0 | gather m1   | gather m2   | ...
                        | send m0 ....| send m1 ....| send m2 ...
    receiver:           | recv m0 ....| recv m1 ....| recv m2 ...
                                      | scatter m0  | scatter m1 | ...

The sender gathers message i+1 while message i is on the wire; the receiver has the
receives of the next messages posted while it scatters message i (it posts them ahead,
up to the depth, so a sender rarely waits for one). gloo writes a message in the thread
that posts its send when the receive is already there, so on CPU the gathers run in a
helper thread (torch releases the GIL while copying). On CUDA the gathers, scatters and
NCCL's stream are ordered by the streams, so buffer reuse needs no host syncs.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from kv_transfer.blocks import BlockMover
from kv_transfer.channel import DistChannelBackend, PayloadResult, first_bad_layer
from kv_transfer.errors import InvalidTransferArgument
from kv_transfer.header import CONTROL_WORDS, OPENING_MESSAGE_BYTES, HeaderFields, SenderHeader
from kv_transfer.layout import KVLayout, LayerHook
from kv_transfer.links import Group, Xfer, group_backend_name
from kv_transfer.pairs import PairGroup

# Layers smaller than this travel together (a wire-format constant: both sides must use
# the same value, and the header's layers_per_message field checks that they do).
MIN_MESSAGE_BYTES = 1 << 20
# Staging buffers per side: up to this many messages in flight, so the sender rarely finds
# its receive not yet posted (gloo then needs an extra round trip for that message).
DEFAULT_PIPELINE_DEPTH = 4


def layers_per_message(num_layers: int, layer_bytes: int) -> int:
    return max(1, min(num_layers, -(-MIN_MESSAGE_BYTES // layer_bytes)))


class P2PBackend(DistChannelBackend):
    """KV over ``dist.isend``/``dist.irecv`` in ``group`` (None: the default group; or a
    pair group from ``kv_transfer.pairs``).

    ``device`` is where the caches live: CPU needs a gloo group, CUDA an NCCL group.
    ``checksums`` turns on debug checksums (both sides must agree: it is in the header).
    ``on_layer_staged`` (tests) sees each layer on the sender after its gather, before it
    leaves. ``pipeline_depth``: messages in flight, each with its staging buffer (memory:
    depth x message bytes on each side).
    """

    def __init__(
        self,
        group: Group,
        device: torch.device | str,
        *,
        checksums: bool = False,
        on_layer_staged: LayerHook | None = None,
        pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
    ) -> None:
        if pipeline_depth < 2:
            raise InvalidTransferArgument("pipeline_depth", f"must be >= 2, got {pipeline_depth}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        need = "nccl" if device.type == "cuda" else "gloo"
        direct = isinstance(group, PairGroup)
        group_backend = group_backend_name(group) if direct or dist.is_initialized() else need
        if need not in group_backend:
            raise InvalidTransferArgument(
                "group", f"{device.type} caches need a {need} group, this one is {group_backend}"
            )
        super().__init__(
            group, device, device, checksums=checksums, on_layer_staged=on_layer_staged
        )
        self.name = need
        self.pipeline_depth = pipeline_depth
        self._gatherer: ThreadPoolExecutor | None = None  # CPU: gathers overlap sends

    def _layers_per_message(self, layout: KVLayout, num_blocks: int) -> int:
        if self._opening_message:
            control = CONTROL_WORDS + (2 * layout.num_layers if self.checksums else 0)
            payload = layout.num_layers * layout.layer_bytes(num_blocks)
            if 8 * control + payload <= OPENING_MESSAGE_BYTES:
                return 0  # every layer rides in the opening message
        return layers_per_message(layout.num_layers, layout.layer_bytes(num_blocks))

    def _inline(self, fields: HeaderFields) -> bool:
        return self._opening_message and fields.layers_per_message == 0

    def _payload_messages(self, sender: SenderHeader) -> list[tuple[int, torch.dtype]]:
        per = sender.layers_per_message
        if per < 1:  # a header without layer messages (e.g. a CUDA IPC sender)
            return []
        sizes = [min(per, sender.num_layers - first) for first in range(0, sender.num_layers, per)]
        return [(sender.message_numel(n), sender.dtype) for n in sizes]

    def _send_layers(
        self, x: Xfer, mover: BlockMover, layout: KVLayout, num_blocks: int, per_message: int
    ) -> tuple[float, ...]:
        depth = self.pipeline_depth
        bufs = self.staging(x.peer).get(layout, num_blocks, layers=per_message, count=depth)
        firsts = range(0, layout.num_layers, per_message)
        messages = [
            bufs[m % depth][: min(per_message, layout.num_layers - f)] for m, f in enumerate(firsts)
        ]
        done: list[float] = []
        in_flight: deque[tuple[dist.Work, int]] = deque()  # (work, layers in it)

        def finish_oldest() -> None:
            work, count = in_flight.popleft()
            self._links.wait(work, x, "send of layers")
            done.extend([time.perf_counter() - x.start] * count)

        def gather(m: int) -> Future[None] | None:
            """Start filling message m (sends 0 .. m-2 posted). Its buffer was last used by
            message m - depth: with at most depth - 2 sends in flight, that one is over."""
            if m >= len(messages):
                return None
            while len(in_flight) > depth - 2:
                finish_oldest()
            if self._device.type == "cuda":  # kernels are asynchronous already
                mover.gather(firsts[m], messages[m])
                return None
            return self._gather_thread().submit(mover.gather, firsts[m], messages[m])

        pending = gather(0)
        for m, first in enumerate(firsts):
            if pending is not None:
                pending.result()
            buf = messages[m]
            self._staged(first, buf)
            pending = gather(m + 1)  # on the gather thread while this message is written
            in_flight.append((self._links.isend(buf, x), len(buf)))
        while in_flight:
            finish_oldest()
        return tuple(done)

    def _gather_thread(self) -> ThreadPoolExecutor:
        if self._gatherer is None:
            self._gatherer = ThreadPoolExecutor(1, thread_name_prefix="kv-transfer-gather")
        return self._gatherer

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)
        if self._gatherer is not None:
            self._gatherer.shutdown()
            self._gatherer = None

    def _recv_layers(
        self,
        x: Xfer,
        mover: BlockMover,
        layout: KVLayout,
        num_blocks: int,
        per_message: int,
        checksums: list[int] | None,
        source_ids: list[int] | None,
    ) -> PayloadResult:
        depth = self.pipeline_depth
        bufs = self.staging(x.peer).get(layout, num_blocks, layers=per_message, count=depth)
        firsts = range(0, layout.num_layers, per_message)
        posted: deque[dist.Work] = deque()
        done: list[float] = []
        failure = None

        def post(m: int) -> None:
            if m < len(firsts):
                count = min(per_message, layout.num_layers - firsts[m])
                posted.append(self._links.irecv(bufs[m % depth][:count], x))

        for m in range(depth):  # receives posted ahead: the sender never waits for one
            post(m)
        for m, first in enumerate(firsts):
            self._links.wait(posted.popleft(), x, f"layers from {first}")
            buf = bufs[m % depth][: min(per_message, layout.num_layers - first)]
            # Write only the layers before the first bad checksum; after a failure the
            # remaining messages are still received (and dropped), so the channel stays in
            # step for the next transfer.
            good = len(buf) if failure is None else 0
            if failure is None and checksums is not None:
                failure = first_bad_layer(buf, first, checksums)
                good = len(buf) if failure is None else failure.detail - first
            if good:
                mover.scatter(buf[:good], first)
            done.extend([time.perf_counter() - x.start] * len(buf))
            post(m + depth)  # into the buffer just scattered
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        return PayloadResult(tuple(done), failure)
