"""What the attention layers need to know about the batch besides the tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Describes one forward pass.

    Prefill: sequences are packed back to back; ``cu_seqlens`` (B+1,) delimits them.
    Decode: one token per sequence; ``block_tables`` (B, max_blocks) and ``context_lens``
    (B,) locate each sequence's cached K/V. ``slot_mapping`` (T,) says where each new
    token's K/V is stored (-1: nowhere, for padding).
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
