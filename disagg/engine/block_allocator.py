"""Bookkeeping of the paged KV pool: which blocks are free, and how many owners each
used block has (reference counts make prefix sharing possible)."""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Raised when more blocks are asked for than are free; schedulers check
    :meth:`BlockAllocator.can_allocate` first, so this signals a scheduling bug."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Adds an owner to blocks already in use (e.g. a shared prompt prefix)."""
        for b in blocks:
            assert self._ref_counts[b] > 0, f"block {b} is free and cannot be shared"
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one owner of each block; a block with no owner left is free again."""
        for b in blocks:
            assert self._ref_counts[b] > 0, f"block {b} freed twice"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def check_integrity(self) -> None:
        """Every block is either free (count 0, listed once) or owned (count > 0)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, count in enumerate(self._ref_counts):
            assert (count == 0) == (b in free), f"block {b}: count {count}, free={b in free}"
