"""The block allocator's bookkeeping, checked against a plain reference-count model under
random allocate / share / free sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from disagg.engine.block_allocator import BlockAllocator, OutOfBlocksError


class AllocatorMachine(RuleBasedStateMachine):
    """Each "owner" holds a list of blocks (as a sequence's block table does); the model
    says a block's reference count is the number of owners holding it."""

    @initialize(num_blocks=st.integers(1, 24))
    def setup(self, num_blocks: int) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.owners: list[list[int]] = []

    def _model_counts(self) -> list[int]:
        counts = [0] * self.allocator.num_blocks
        for blocks in self.owners:
            for b in blocks:
                counts[b] += 1
        return counts

    @rule(n=st.integers(0, 30))
    def allocate(self, n: int) -> None:
        free_before = self.allocator.num_free
        if n > free_before:
            with pytest.raises(OutOfBlocksError):
                self.allocator.allocate(n)
            assert self.allocator.num_free == free_before  # a refused request takes nothing
            return
        in_use = {b for blocks in self.owners for b in blocks}
        blocks = self.allocator.allocate(n)
        assert len(blocks) == len(set(blocks)) == n
        assert not in_use & set(blocks), "handed out a block that is still owned"
        assert all(0 <= b < self.allocator.num_blocks for b in blocks)
        self.owners.append(blocks)

    @precondition(lambda self: any(self.owners))
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        source = data.draw(st.sampled_from([o for o in self.owners if o]))
        subset = data.draw(st.lists(st.sampled_from(source), min_size=1, unique=True))
        self.allocator.share(subset)
        self.owners.append(subset)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.owners) - 1))
        self.allocator.free(self.owners.pop(index))

    @invariant()
    def matches_model(self) -> None:
        self.allocator.check_integrity()
        counts = self._model_counts()
        assert [self.allocator.ref_count(b) for b in range(self.allocator.num_blocks)] == counts
        assert self.allocator.num_free == counts.count(0)
        assert self.allocator.num_used == self.allocator.num_blocks - counts.count(0)


AllocatorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
TestAllocatorMachine = AllocatorMachine.TestCase


@given(num_blocks=st.integers(1, 32), extra=st.integers(1, 8))
def test_allocating_more_than_free_raises(num_blocks: int, extra: int) -> None:
    allocator = BlockAllocator(num_blocks)
    held = allocator.allocate(num_blocks // 2)
    with pytest.raises(OutOfBlocksError, match="asked for"):
        allocator.allocate(allocator.num_free + extra)
    assert allocator.num_free == num_blocks - len(held)
    assert not allocator.can_allocate(allocator.num_free + 1)
    assert allocator.can_allocate(allocator.num_free)
    allocator.check_integrity()


def test_every_block_can_be_handed_out_once() -> None:
    allocator = BlockAllocator(5)
    assert sorted(allocator.allocate(5)) == [0, 1, 2, 3, 4]
    assert allocator.num_free == 0
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(1)


def test_double_free_trips_an_assertion() -> None:
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    allocator.free(blocks)
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free(blocks[:1])


def test_freeing_a_shared_block_keeps_it_until_the_last_owner() -> None:
    allocator = BlockAllocator(3)
    blocks = allocator.allocate(2)
    allocator.share(blocks[:1])
    allocator.free(blocks)
    assert allocator.num_free == 2  # blocks[0] still has its second owner
    assert allocator.ref_count(blocks[0]) == 1
    allocator.free(blocks[:1])
    assert allocator.num_free == 3
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free(blocks[:1])
    allocator.check_integrity()


def test_sharing_a_free_block_trips_an_assertion() -> None:
    allocator = BlockAllocator(2)
    with pytest.raises(AssertionError, match="is free"):
        allocator.share([1])


def test_integrity_check_catches_a_corrupted_free_list() -> None:
    # The check itself must be able to fail, or the properties above prove nothing.
    allocator = BlockAllocator(3)
    allocator.allocate(1)
    allocator._free.append(allocator._free[0])
    with pytest.raises(AssertionError):
        allocator.check_integrity()


def test_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)
