"""Admission rules shared by every batcher (the engine, the nodes, the simulator)."""

from __future__ import annotations

# Admitting a request beside running ones keeps this share of the KV pool free for
# their growth, so the next decode steps do not preempt the newcomer at once (which
# would waste its prefill). Nothing is kept back for a request that runs alone.
WATERMARK_FRACTION = 0.01


def watermark(capacity: int) -> int:
    """Blocks (or tokens) of ``capacity`` kept free when admitting beside others."""
    return int(capacity * WATERMARK_FRACTION)
