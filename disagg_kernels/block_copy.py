"""Copy whole KV-cache blocks between a cache and a contiguous staging buffer.

Used to move KV between processes block by block and layer by layer: ``gather_blocks``
packs the chosen blocks of one cache tensor into a contiguous buffer, ``scatter_blocks``
unpacks such a buffer into another cache. A block is ``cache[i]``, of any trailing shape
(e.g. (block_size, H_kv, D)); the Triton kernel copies it as one flat run of elements.
"""

from __future__ import annotations

import torch

from disagg_kernels._triton import HAS_TRITON, tl, triton
from disagg_kernels.backend import resolve

# Elements each Triton program copies; a block of (16, 8, 128) takes 16 programs.
_COPY_BLOCK = 1024


def _check_ids(cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    assert cache.dim() >= 1, cache.shape
    assert block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64), block_ids
    assert block_ids.device == cache.device, (block_ids.device, cache.device)


def _check_buffer(buf: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    assert buf.shape == (block_ids.shape[0], *cache.shape[1:]), (buf.shape, cache.shape)
    assert buf.dtype == cache.dtype and buf.device == cache.device
    assert buf.is_contiguous()


def gather_blocks_torch(
    cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    _check_ids(cache, block_ids)
    if out is None:
        out = cache.new_empty((block_ids.shape[0], *cache.shape[1:]))  # (n, *block_shape)
    _check_buffer(out, cache, block_ids)
    return torch.index_select(cache, 0, block_ids, out=out)  # (n, *block_shape)


def scatter_blocks_torch(src: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    _check_ids(cache, block_ids)
    _check_buffer(src, cache, block_ids)
    cache.index_copy_(0, block_ids.long(), src)  # cache[block_ids[i]] = src[i]


if HAS_TRITON:

    @triton.jit
    def _copy_blocks_kernel(
        src_ptr,
        dst_ptr,
        ids_ptr,
        src_stride,
        dst_stride,
        block_numel,
        SCATTER: tl.constexpr,  # False: dst[i] = src[ids[i]]; True: dst[ids[i]] = src[i]
        BLOCK: tl.constexpr,
    ):
        # Grid: (block index i, chunk of BLOCK elements within the block).
        i = tl.program_id(0)
        chunk = tl.program_id(1)
        block_id = tl.load(ids_ptr + i).to(tl.int64)
        if SCATTER:
            src_off = i.to(tl.int64) * src_stride
            dst_off = block_id * dst_stride
        else:
            src_off = block_id * src_stride
            dst_off = i.to(tl.int64) * dst_stride
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < block_numel
        x = tl.load(src_ptr + src_off + offs, mask=mask)
        tl.store(dst_ptr + dst_off + offs, x, mask=mask)


def _copy_blocks_triton(
    src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor, scatter: bool
) -> None:
    n = block_ids.shape[0]
    block_numel = src[0].numel() if n else 0
    if block_numel == 0:
        return
    # Each block must be one flat run; the stride between blocks is free.
    assert src[0].is_contiguous() and dst[0].is_contiguous(), "blocks must be contiguous"
    assert block_ids.is_contiguous()
    grid = (n, triton.cdiv(block_numel, _COPY_BLOCK))
    _copy_blocks_kernel[grid](
        src,
        dst,
        block_ids,
        src.stride(0),
        dst.stride(0),
        block_numel,
        SCATTER=scatter,
        BLOCK=_COPY_BLOCK,
    )


def gather_blocks_triton(
    cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    _check_ids(cache, block_ids)
    if out is None:
        out = cache.new_empty((block_ids.shape[0], *cache.shape[1:]))  # (n, *block_shape)
    _check_buffer(out, cache, block_ids)
    _copy_blocks_triton(cache, out, block_ids, scatter=False)
    return out


def scatter_blocks_triton(src: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    _check_ids(cache, block_ids)
    _check_buffer(src, cache, block_ids)
    _copy_blocks_triton(src, cache, block_ids, scatter=True)


def gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``cache[block_ids]`` as a contiguous (n, *block_shape) tensor (``out`` if given).

    cache: (num_blocks, *block_shape); block_ids: (n,) int32/int64.
    """
    if resolve(cache) == "triton":
        return gather_blocks_triton(cache, block_ids, out)
    return gather_blocks_torch(cache, block_ids, out)


def scatter_blocks(src: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """In place: ``cache[block_ids[i]] = src[i]``. block_ids must be distinct.

    src: (n, *block_shape) contiguous; cache: (num_blocks, *block_shape).
    """
    if resolve(cache) == "triton":
        scatter_blocks_triton(src, cache, block_ids)
    else:
        scatter_blocks_torch(src, cache, block_ids)
