"""Moving a hand-off plan's pieces: cut from a prefill rank's paged pool, written into a
decode rank's paged pool at that rank's own layer and KV-head offsets.

A pool is ``KVCache.data``, (layers, 2, blocks, block_size, H_kv, D) for the rank's
layers and KV heads (``KVCacheSpec.layers`` / ``kv_heads``, global indices). A piece on
the wire is one contiguous tensor (layers, 2, n, block_size, heads, D): its layer run,
K then V, the request's n blocks in block-table order, its KV heads — whatever the
block ids on either side, and whichever heads and layers either pool holds besides.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from disagg.engine.kv_cache import KVCache
from disagg.engine.parallel.handoff import HandoffPlan, Piece
from kv_transfer.base import KVTransferBackend, TransferStats
from kv_transfer.errors import InvalidTransferArgument
from kv_transfer.header import RequestId
from kv_transfer.layout import ByteBuffer, KVLayers


def piece_shape(piece: Piece, num_blocks: int, cache: KVCache) -> tuple[int, ...]:
    s = cache.spec
    return (len(piece.layers), 2, num_blocks, s.block_size, len(piece.kv_heads), s.head_dim)


def gather_piece(
    cache: KVCache, piece: Piece, block_ids: Sequence[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The piece's KV cut from a prefill rank's pool, as one contiguous tensor (into
    ``out``, a staging buffer of :func:`piece_shape`, when given)."""
    view = _piece_view(cache, piece)  # (layers, 2, pool_blocks, bs, heads, D), strided
    ids = _block_ids(cache, block_ids)
    if out is None:
        return view.index_select(2, ids)  # (layers, 2, n, bs, heads, D)
    _check_shape(out, piece_shape(piece, len(ids), cache), cache)
    return torch.index_select(view, 2, ids, out=out)


def scatter_piece(
    cache: KVCache, piece: Piece, block_ids: Sequence[int], data: torch.Tensor
) -> None:
    """Writes a received piece into a decode rank's pool: its blocks ``block_ids`` (the
    request's block table there), at this pool's offsets of the piece's layers and heads."""
    view = _piece_view(cache, piece)
    ids = _block_ids(cache, block_ids)
    _check_shape(data, piece_shape(piece, len(ids), cache), cache)
    if view.is_cuda:
        view.index_copy_(2, ids, data)  # one kernel; writes through the view
        return
    # On CPU, one strided copy per block runs about twice as fast as index_copy_ into
    # the strided view (bench/handoff.py's piece sizes, one thread).
    for j, block in enumerate(ids.tolist()):
        view[:, :, block].copy_(data[:, :, j])


def send_piece(
    backend: KVTransferBackend,
    request_id: RequestId,
    cache: KVCache,
    piece: Piece,
    block_ids: Sequence[int],
    peer: int,
    *,
    num_tokens: int,
    timeout: float,
    staging: ByteBuffer | None = None,
) -> TransferStats:
    """Sends one piece over a pair channel (the ``recv_piece`` of ``piece.dst_rank``
    takes it). A piece holding all of this pool's KV heads goes straight from the pool's
    blocks (the channel gathers them, as for a whole pool); one holding some of them is
    first cut into ``staging`` (:func:`gather_piece`) and sent as a pool of its own."""
    direct = _whole_heads(cache, piece)
    if direct is not None:
        layers, ids = direct, list(block_ids)
    else:
        shape = piece_shape(piece, len(block_ids), cache)
        buf = gather_piece(cache, piece, block_ids, out=_staged(staging, shape, cache))
        layers, ids = _as_layers(buf), list(range(len(block_ids)))
    return backend.send(request_id, layers, ids, peer, num_tokens=num_tokens, timeout=timeout)


def recv_piece(
    backend: KVTransferBackend,
    request_id: RequestId,
    cache: KVCache,
    piece: Piece,
    block_ids: Sequence[int],
    peer: int,
    *,
    num_tokens: int,
    timeout: float,
    staging: ByteBuffer | None = None,
) -> TransferStats:
    """Receives one piece into this decode rank's pool, blocks ``block_ids``: straight
    into the pool when the piece holds all of its KV heads, else into ``staging`` and
    then :func:`scatter_piece` (only once the channel has checked it: a failed transfer
    leaves the pool untouched)."""
    direct = _whole_heads(cache, piece)
    if direct is not None:
        return backend.recv(
            request_id, direct, list(block_ids), peer, num_tokens=num_tokens, timeout=timeout
        )
    shape = piece_shape(piece, len(block_ids), cache)
    buf = _staged(staging, shape, cache)
    stats = backend.recv(
        request_id,
        _as_layers(buf),
        list(range(len(block_ids))),
        peer,
        num_tokens=num_tokens,
        timeout=timeout,
    )
    scatter_piece(cache, piece, block_ids, buf)
    return stats


def move_rank_pieces(
    side: Literal["send", "recv"],
    request_id: RequestId,
    cache: KVCache,
    pieces: Sequence[Piece],
    block_ids: Sequence[int],
    channels: Mapping[int, tuple[KVTransferBackend, int]],
    *,
    num_tokens: int,
    timeout: float,
    staging: Mapping[int, ByteBuffer] | None = None,
) -> list[TransferStats]:
    """One rank's part of a request's hand-off: its pieces (``plan.from_rank(r)`` on a
    prefill rank, ``plan.to_rank(r)`` on a decode rank), one thread per peer rank, since
    the pairs are independent channels. ``channels`` maps the peer's rank (decode rank
    for a sender, prefill rank for a receiver) to its pair channel and the peer's index
    on it; ``staging``, per peer rank, the buffers reused across requests. Raises the
    first failure once every piece has ended: one failed pair fails the transfer."""
    move = send_piece if side == "send" else recv_piece
    stats: list[TransferStats | None] = [None] * len(pieces)
    errors: list[BaseException] = []

    def one(i: int, piece: Piece) -> None:
        peer = piece.dst_rank if side == "send" else piece.src_rank
        backend, index = channels[peer]
        buf = None if staging is None else staging[peer]
        try:
            stats[i] = move(backend, request_id, cache, piece, block_ids, index,
                            num_tokens=num_tokens, timeout=timeout, staging=buf)  # fmt: skip
        except BaseException as e:  # re-raised below, after every pair has ended
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(pieces)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [s for s in stats if s is not None]


def copy_plan(
    plan: HandoffPlan,
    src: Mapping[int, KVCache],
    src_blocks: Sequence[int],
    dst: Mapping[int, KVCache],
    dst_blocks: Sequence[int],
) -> None:
    """Runs every piece of ``plan`` in this process: from the prefill ranks' pools
    ``src`` (by rank; every rank of a group shares the request's block ids) to the decode
    ranks' ``dst``. What a pair channel does, without the wire."""
    for piece in plan.pieces:
        scatter_piece(
            dst[piece.dst_rank],
            piece,
            dst_blocks,
            gather_piece(src[piece.src_rank], piece, src_blocks),
        )


def _whole_heads(cache: KVCache, piece: Piece) -> KVLayers | None:
    """The pool's own per-layer (k, v) views for the piece's layers, when the piece holds
    every KV head of the pool (each block then is contiguous in the pool)."""
    layers = _local(piece.layers, cache.spec.layers, "layers")
    _local(piece.kv_heads, cache.spec.kv_heads, "kv_heads")
    if piece.kv_heads != cache.spec.kv_heads:
        return None
    return cache.layers[layers]


def _staged(staging: ByteBuffer | None, shape: tuple[int, ...], cache: KVCache) -> torch.Tensor:
    dtype = cache.data.dtype
    numel = 1
    for n in shape:
        numel *= n
    if staging is None:
        return torch.empty(shape, dtype=dtype, device=cache.data.device)
    return staging.get(numel * dtype.itemsize).view(dtype).view(shape)


def _as_layers(buf: torch.Tensor) -> KVLayers:
    # (layers, 2, n, bs, heads, D) -> per layer (k, v), each (n, bs, heads, D)
    return [(buf[i, 0], buf[i, 1]) for i in range(buf.shape[0])]


def _piece_view(cache: KVCache, piece: Piece) -> torch.Tensor:
    spec = cache.spec
    layers = _local(piece.layers, spec.layers, "layers")
    heads = _local(piece.kv_heads, spec.kv_heads, "kv_heads")
    return cache.data[layers, :, :, :, heads]


def _local(wanted: range, held: range, field: str) -> slice:
    """``wanted`` (global indices) as a slice of a pool holding ``held``."""
    if not wanted or wanted.start < held.start or wanted.stop > held.stop:
        raise InvalidTransferArgument(
            field, f"the piece's {wanted} is not inside the pool's {held}"
        )
    return slice(wanted.start - held.start, wanted.stop - held.start)


def _block_ids(cache: KVCache, block_ids: Sequence[int]) -> torch.Tensor:
    ids = [int(i) for i in block_ids]
    if not ids:
        raise InvalidTransferArgument("block_ids", "no blocks")
    bad = [i for i in ids if not 0 <= i < cache.num_blocks]
    if bad:
        raise InvalidTransferArgument(
            "block_ids", f"{bad[:5]} are not block ids of a {cache.num_blocks}-block pool"
        )
    if len(set(ids)) != len(ids):
        raise InvalidTransferArgument("block_ids", "a block id appears twice")
    return torch.tensor(ids, dtype=torch.int64, device=cache.data.device)


def _check_shape(t: torch.Tensor, shape: tuple[int, ...], cache: KVCache) -> None:
    if tuple(t.shape) != shape or t.dtype != cache.data.dtype or not t.is_contiguous():
        raise InvalidTransferArgument(
            "data",
            f"expected a contiguous {shape} {cache.data.dtype} tensor, got "
            f"{tuple(t.shape)} {t.dtype}",
        )
