"""Turns the last position's logits of each sequence into its next token."""

from __future__ import annotations

import torch

from disagg.engine.sequence import Sequence


def sample(
    logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None
) -> list[int]:
    """logits (B, vocab) float32 -> one token id per sequence.

    Greedy rows take the argmax. Sampled rows apply temperature, then top-k, then top-p,
    and draw from what remains: rows with a seed use their own generator (reproducible
    whatever the batch), the others share one draw via the exponential-race trick, which
    needs no host sync per row. ``generator`` drives the unseeded rows (the engine's own
    stream, so runs are repeatable without touching torch's global RNG).
    """
    assert logits.shape[0] == len(seqs)
    if all(s.params.greedy for s in seqs):
        return logits.argmax(dim=-1).tolist()

    greedy_rows = [i for i, s in enumerate(seqs) if s.params.greedy]
    temps = torch.tensor(
        [s.params.temperature if not s.params.greedy else 1.0 for s in seqs],
        dtype=torch.float32,
        device=logits.device,
    )
    # Top-k on the raw logits: a positive temperature does not change their order.
    kept = _apply_top_k(logits, [s.params.top_k for s in seqs])
    # Shift each row's max to 0 before dividing (softmax and top-p are shift-invariant):
    # a tiny temperature then sends the others to -inf, where dividing the raw logits
    # would overflow to +-inf and turn the softmax into NaN.
    scaled = (kept - kept.amax(dim=-1, keepdim=True)) / temps.unsqueeze(1)  # (B, V)
    scaled = _apply_top_p(scaled, [s.params.top_p for s in seqs])
    probs = torch.softmax(scaled, dim=-1)  # (B, V)

    # Exponential race: argmax(p / E) with E ~ Exp(1) is a sample from p.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    for i, s in enumerate(seqs):
        if s.generator is not None and not s.params.greedy:
            noise[i] = torch.empty_like(probs[i]).exponential_(1, generator=s.generator)
    tokens = (probs / noise).argmax(dim=-1)
    if greedy_rows:
        rows = torch.tensor(greedy_rows, device=logits.device)
        tokens[rows] = logits[rows].argmax(dim=-1)
    return tokens.tolist()


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    if all(k == vocab for k in ks):
        return logits
    k_max = max(ks)
    top_vals = logits.topk(k_max, dim=-1).values  # (B, k_max), descending
    kth = top_vals.gather(1, torch.tensor(ks, device=logits.device).unsqueeze(1) - 1)  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_ps):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    p = torch.tensor(top_ps, device=logits.device).unsqueeze(1)
    # Drop a token when the tokens strictly before it already cover p; the top one stays.
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
