"""CUDA IPC backend: a prefill and a decode process sharing one GPU.

The prefill (sending) process exports its whole KV pool once (``export_pool``: a
``KVPoolHandle``, plain data with an explicit byte encoding, sent over the control plane);
the decode (receiving) process opens it once (``attach_peer_pool``). A transfer then runs
the usual header/verdict protocol over a CPU (gloo) group, the header extension carrying
the sender's block ids, and the receiver copies device to device: per chunk of layers
(``chunk_bytes``, 16 MiB by default), one gather of their K and V blocks from the peer's
pool into a staging buffer, then one scatter into its own blocks. Nothing goes through
the host.

Ordering: the sender synchronises its stream before the header leaves, so every write of
the prefill is visible; the receiver synchronises before its final OK, so when ``send``
returns the sender may free the blocks.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from kv_transfer.blocks import BlockMover
from kv_transfer.channel import DistChannelBackend, PayloadResult, first_bad_layer
from kv_transfer.errors import InvalidTransferArgument
from kv_transfer.header import DTYPE_CODES, MISMATCH_FIELDS, Flag, Status, Verdict, dtype_code
from kv_transfer.layout import KVLayers, KVLayout, LayerHook
from kv_transfer.links import Group, Xfer, group_backend_name
from kv_transfer.pairs import PairGroup

_HANDLE_VERSION = 1
# Layers copied per gather/scatter pair: few kernel launches, and a staging buffer small
# enough to stay in a large GPU's L2 cache between the gather and the scatter.
DEFAULT_CHUNK_BYTES = 16 << 20
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def cuda_device_uuid(device: torch.device | int) -> str:
    """The GPU's UUID: the same physical GPU has the same one in every process."""
    return str(torch.cuda.get_device_properties(device).uuid)


@dataclass(frozen=True, slots=True)
class KVPoolHandle:
    """What another process needs to map a KV pool (layers, 2, blocks, *block_shape)."""

    device_uuid: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # elements
    dtype_code: int
    # The fields of UntypedStorage._share_cuda_(), device index excluded.
    ipc_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    def to_bytes(self) -> bytes:
        fields = asdict(self)
        for name in ("ipc_handle", "ref_counter_handle", "event_handle"):
            if fields[name] is not None:
                fields[name] = base64.b64encode(fields[name]).decode()
        return json.dumps({"version": _HANDLE_VERSION, **fields}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KVPoolHandle:
        try:
            fields = json.loads(data)
            if fields.pop("version") != _HANDLE_VERSION:
                raise ValueError("unknown version")
            for name in ("ipc_handle", "ref_counter_handle", "event_handle"):
                if fields[name] is not None:
                    fields[name] = base64.b64decode(fields[name])
            fields["shape"] = tuple(fields["shape"])
            fields["stride"] = tuple(fields["stride"])
            handle = cls(**fields)
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidTransferArgument("pool_handle", f"not a KV pool handle: {e}") from None
        if handle.dtype_code not in _CODE_DTYPES or len(handle.shape) != 6:
            raise InvalidTransferArgument("pool_handle", "unknown dtype or not a 6-D pool")
        return handle


def export_kv_pool(pool: torch.Tensor) -> KVPoolHandle:
    """A handle to ``pool`` (``KVCache.data``: (layers, 2, blocks, *block_shape), contiguous,
    CUDA). The pool must outlive every process that opened it."""
    if not pool.is_cuda or pool.dim() != 6 or not pool.is_contiguous():
        raise InvalidTransferArgument(
            "pool", "export a contiguous CUDA (layers, 2, blocks, block_size, H_kv, D) tensor"
        )
    (
        _device_index,
        ipc_handle,
        size_bytes,
        offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = pool.untyped_storage()._share_cuda_()
    return KVPoolHandle(
        device_uuid=cuda_device_uuid(pool.device),
        shape=tuple(pool.shape),
        stride=tuple(pool.stride()),
        storage_offset=pool.storage_offset(),
        dtype_code=dtype_code(pool.dtype),
        ipc_handle=ipc_handle,
        storage_size_bytes=size_bytes,
        storage_offset_bytes=offset_bytes,
        ref_counter_handle=ref_counter_handle,
        ref_counter_offset=ref_counter_offset,
        event_handle=event_handle,
        event_sync_required=bool(event_sync_required),
    )


def open_kv_pool(handle: KVPoolHandle) -> torch.Tensor:
    """Map a pool exported by another process on the same GPU (not the same process:
    CUDA cannot open its own IPC handles)."""
    index = next(
        (i for i in range(torch.cuda.device_count()) if cuda_device_uuid(i) == handle.device_uuid),
        None,
    )
    if index is None:
        raise InvalidTransferArgument(
            "pool_handle",
            f"the pool lives on GPU {handle.device_uuid}, which this process cannot see",
        )
    storage = torch.UntypedStorage._new_shared_cuda(
        index,
        handle.ipc_handle,
        handle.storage_size_bytes,
        handle.storage_offset_bytes,
        handle.ref_counter_handle,
        handle.ref_counter_offset,
        handle.event_handle,
        handle.event_sync_required,
    )
    dtype = _CODE_DTYPES[handle.dtype_code]
    pool = torch.empty((0,), dtype=dtype, device=torch.device("cuda", index))
    return pool.set_(storage, handle.storage_offset, handle.shape, handle.stride)


class CudaIpcBackend(DistChannelBackend):
    """KV between processes on one GPU; control messages over ``group`` (a gloo group).

    The receiver copies from the sender's pool, mapped into its own address space. On a
    CPU ``device`` the same protocol runs over a pool in torch shared memory, attached as
    a tensor (tests); ``make_backend`` only builds it for CUDA.

    A sending process passes its ``pool`` (``KVCache.data``) and gives ``export_pool()``
    to its peers; a receiving process calls ``attach_peer_pool(peer, handle)`` once per
    sending peer. ``on_layer_staged`` (tests) sees each layer on the receiver after the
    gather from the peer's pool, before its checksum is checked. ``chunk_bytes``: how much
    KV one gather/scatter pair moves (whole layers, at least one).
    """

    def __init__(
        self,
        group: Group,
        device: torch.device | str,
        *,
        pool: torch.Tensor | None = None,
        checksums: bool = False,
        on_layer_staged: LayerHook | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        direct = isinstance(group, PairGroup)
        if (direct or dist.is_initialized()) and "gloo" not in group_backend_name(group):
            raise InvalidTransferArgument(
                "group", "CUDA IPC sends its control messages over a gloo group"
            )
        super().__init__(
            group, device, torch.device("cpu"), checksums=checksums, on_layer_staged=on_layer_staged
        )
        self.name = "cuda_ipc"
        self._pool = pool
        self._peer_pools: dict[int, torch.Tensor] = {}
        self.chunk_bytes = chunk_bytes

    def export_pool(self) -> KVPoolHandle:
        if self._pool is None:
            raise InvalidTransferArgument("pool", "this backend was made without a pool to export")
        return export_kv_pool(self._pool)

    def attach_peer_pool(self, peer: int, pool: KVPoolHandle | torch.Tensor) -> None:
        """Map the pool ``peer`` exported (a handle), or take an already shared pool tensor
        (CPU shared memory: how the protocol is tested without a GPU)."""
        if isinstance(pool, KVPoolHandle):
            pool = open_kv_pool(pool)
        if pool.dim() != 6 or pool.device != self._device:
            raise InvalidTransferArgument(
                "pool", f"expected a (layers, 2, blocks, ...) pool on {self._device}"
            )
        self._peer_pools[peer] = pool

    def peer_pool(self, peer: int) -> torch.Tensor:
        """The pool ``peer`` exported, as mapped here (layers, 2, blocks, *block_shape)."""
        return self._peer_pools[peer]

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)
        self._peer_pools.clear()

    def _flags(self) -> Flag:
        return super()._flags() | Flag.SOURCE_IDS

    def _check_source(self, kv_layers: KVLayers, layout: KVLayout) -> None:
        self._check_device(layout)
        pool = self._pool
        if pool is None:
            raise InvalidTransferArgument("pool", "a sending CUDA IPC backend needs its pool")
        if pool.shape[0] != len(kv_layers) or any(
            k.data_ptr() != pool[i, 0].data_ptr() or v.data_ptr() != pool[i, 1].data_ptr()
            for i, (k, v) in enumerate(kv_layers)
        ):
            raise InvalidTransferArgument(
                "kv_layers", "must be the exported pool's layers: (pool[i, 0], pool[i, 1])"
            )

    def _check_destination(self, x: Xfer, layout: KVLayout) -> None:
        self._check_device(layout)
        if x.peer not in self._peer_pools:
            raise InvalidTransferArgument(
                "peer", f"no KV pool attached for peer {x.peer}; call attach_peer_pool first"
            )

    def _before_header(self, layout: KVLayout) -> None:
        self._sync()

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()

    def _send_layers(
        self, x: Xfer, mover: BlockMover, layout: KVLayout, num_blocks: int, per_message: int
    ) -> tuple[float, ...]:
        return ()  # the receiver reads the layers itself

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
        assert source_ids is not None  # SOURCE_IDS is in both sides' flags
        peer_pool = self._peer_pools[x.peer]  # checked by _check_destination
        failure = self._check_peer_pool(peer_pool, layout, source_ids)
        if failure is not None:
            return PayloadResult((), failure)
        src = torch.tensor(source_ids, dtype=torch.int64, device=self._device)
        peer_layers = [(peer_pool[i, 0], peer_pool[i, 1]) for i in range(layout.num_layers)]
        peer_layout = KVLayout.of(peer_layers)
        source = BlockMover(peer_layers, peer_layout, src)
        per_chunk = max(
            1, min(layout.num_layers, self.chunk_bytes // layout.layer_bytes(num_blocks))
        )
        (staging,) = self.staging(x.peer).get(layout, num_blocks, layers=per_chunk, count=1)
        done: list[float] = []
        for first in range(0, layout.num_layers, per_chunk):
            buf = staging[: min(per_chunk, layout.num_layers - first)]
            source.gather(first, buf)  # device to device, from the peer's pool
            self._staged(first, buf)
            good = len(buf)
            if checksums is not None:
                failure = first_bad_layer(buf, first, checksums)
                good = len(buf) if failure is None else failure.detail - first
            if good:
                mover.scatter(buf[:good], first)
            done.extend([time.perf_counter() - x.start] * good)
            if failure is not None:
                break  # nothing is in flight: no need to drain
        self._sync()  # the copies are done before the OK lets the sender free its blocks
        return PayloadResult(tuple(done), failure)

    def _check_peer_pool(
        self, pool: torch.Tensor, layout: KVLayout, source_ids: list[int]
    ) -> Verdict | None:
        """The attached pool must be the sender's (a stale handle, a sender bug)."""
        field = MISMATCH_FIELDS.index("source_pool")
        if pool.device != self._device or pool.dtype != layout.dtype:
            return Verdict(Status.MISMATCH, field, dtype_code(layout.dtype), dtype_code(pool.dtype))
        if pool.shape[0] != layout.num_layers or tuple(pool.shape[3:]) != layout.block_shape:
            return Verdict(Status.MISMATCH, field, layout.num_layers, pool.shape[0])
        bad = [i for i in source_ids if not 0 <= i < pool.shape[2]]
        if bad:
            field = MISMATCH_FIELDS.index("source_block_ids")
            return Verdict(Status.MISMATCH, field, pool.shape[2], bad[0])
        return None
