"""The sampler on fixed logits (greedy, temperature, top-k, top-p, per-row seeds), and
seeded sampling through the engine.

Distribution checks draw N samples in one call (one batch row per draw) from a generator
with a fixed seed, so they are deterministic; each uses Pearson's chi-square statistic
against the expected distribution, compared with the 0.999 quantile of chi-square (a
correct sampler would fail it for one seed in a thousand, and the seed is fixed). Each
check is shown to reject a slightly wrong distribution, so it is not vacuous.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg import LLM, SamplingParams
from disagg.engine.sampler import sample
from disagg.engine.sequence import Sequence

LOGITS = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, -0.5, 1.0, -2.0])  # (V,), distinct values
V = LOGITS.numel()
N = 20_000
# 0.999 quantiles of chi-square with k degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def seq(params: SamplingParams, seed_generator: bool = True, seq_id: int = 0) -> Sequence:
    s = Sequence(seq_id=seq_id, prompt_token_ids=[1], params=params, arrival_time=0.0)
    if seed_generator and params.seed is not None:
        s.generator = torch.Generator().manual_seed(params.seed)
    return s


def draw(
    params: SamplingParams, n: int = N, logits: torch.Tensor = LOGITS, seed: int = 0
) -> torch.Tensor:
    """n independent draws (one batch row each) -> (V,) counts."""
    seqs = [seq(params, seq_id=i) for i in range(n)]
    tokens = sample(logits.expand(n, -1).clone(), seqs, torch.Generator().manual_seed(seed))
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens with nonzero expected probability, and its
    degrees of freedom. Tokens with zero probability must never be drawn."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {counts}"
    expected = probs[support].double() * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum()) - 1


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    stat, dof = chi_square(counts, probs)
    assert stat < CHI2_999[dof], f"chi2 {stat:.1f} (dof {dof}): {counts / counts.sum()} vs {probs}"


def assert_rejects(counts: torch.Tensor, probs: torch.Tensor) -> None:
    stat, dof = chi_square(counts, probs)
    assert stat > 5 * CHI2_999[dof]


def renormalised(mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    p = torch.softmax(LOGITS / temperature, -1) * mask
    return p / p.sum()


def top_k_set(k: int) -> set[int]:
    return set(LOGITS.topk(k).indices.tolist())


def nucleus(p: float) -> set[int]:
    """Smallest set of the most likely tokens whose probability reaches p (computed in
    float64, independently of the sampler)."""
    probs = torch.softmax(LOGITS.double(), -1)
    order = probs.argsort(descending=True).tolist()
    chosen, total = set(), 0.0
    for t in order:
        chosen.add(t)
        total += probs[t].item()
        if total >= p:
            return chosen
    return chosen


# --- fixed logits -------------------------------------------------------------------------


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    seqs = [seq(SamplingParams(temperature=0)) for _ in range(6)]
    assert sample(logits, seqs) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-6),
        SamplingParams(temperature=1e-40),  # dividing by it overflows float32
        SamplingParams(temperature=1e-5),
    ],
    ids=["top_k=1", "tiny top_p", "T=1e-40", "T=1e-5"],
)
def test_settings_that_leave_one_token_equal_greedy(params: SamplingParams) -> None:
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(5))
    seqs = [seq(params) for _ in range(64)]
    assert sample(logits, seqs, torch.Generator().manual_seed(0)) == logits.argmax(-1).tolist()


def test_temperature_one_draws_follow_softmax() -> None:
    counts = draw(SamplingParams(temperature=1.0))
    assert_matches(counts, torch.softmax(LOGITS, -1))
    assert_rejects(counts, torch.softmax(LOGITS / 1.2, -1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_logits(temperature: float) -> None:
    counts = draw(SamplingParams(temperature=temperature))
    assert_matches(counts, torch.softmax(LOGITS / temperature, -1))
    assert_rejects(counts, torch.softmax(LOGITS, -1))


def test_lower_temperature_concentrates_on_the_argmax() -> None:
    top = int(LOGITS.argmax())
    shares = [
        draw(SamplingParams(temperature=t), n=4000)[top].item() for t in (4.0, 1.0, 0.3, 0.02)
    ]
    assert shares == sorted(shares) and shares[0] < 0.3 * 4000 and shares[-1] == 4000


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_draws_only_the_k_largest_in_proportion(k: int) -> None:
    counts = draw(SamplingParams(temperature=1.0, top_k=k))
    allowed = top_k_set(k)
    assert {t for t in range(V) if counts[t] > 0} == allowed
    mask = torch.tensor([t in allowed for t in range(V)], dtype=torch.float32)
    assert_matches(counts, renormalised(mask))


@pytest.mark.parametrize("k", [0, -1, V, V + 10])
def test_top_k_outside_1_to_vocab_disables_the_filter(k: int) -> None:
    assert_matches(draw(SamplingParams(temperature=1.0, top_k=k)), torch.softmax(LOGITS, -1))


@pytest.mark.parametrize("p", [0.5, 0.75, 0.9])
def test_top_p_draws_only_the_nucleus_in_proportion(p: float) -> None:
    counts = draw(SamplingParams(temperature=1.0, top_p=p))
    allowed = nucleus(p)
    assert len(allowed) < V
    assert {t for t in range(V) if counts[t] > 0} == allowed
    mask = torch.tensor([t in allowed for t in range(V)], dtype=torch.float32)
    assert_matches(counts, renormalised(mask))


def test_top_p_applies_to_the_temperature_scaled_distribution() -> None:
    # At T=0.5 the top two tokens hold ~0.87 of the mass, so top_p=0.7 keeps just them
    # (at T=1 they hold ~0.65, and the same top_p would keep three).
    probs_t = torch.softmax(LOGITS / 0.5, -1)
    top2 = set(probs_t.topk(2).indices.tolist())
    assert probs_t.topk(2).values.sum() >= 0.7 > probs_t.max()
    counts = draw(SamplingParams(temperature=0.5, top_p=0.7), n=4000)
    assert {t for t in range(V) if counts[t] > 0} == top2


def allowed_tokens(logits: torch.Tensor, temperature: float, k: int, p: float) -> set[int]:
    """Tokens that temperature, then top-k, then top-p may leave, computed in float64.
    Ties may be ordered either way, and a token whose preceding mass is within 1e-5 of p
    counts as allowed (float32 rounding may put it either side of the line): a token is
    allowed when the tokens strictly more likely than it hold less than p + 1e-5."""
    scaled = logits.double() / temperature
    if 0 < k < scaled.numel():
        scaled = scaled.masked_fill(scaled < scaled.topk(k).values[-1], float("-inf"))
    probs = torch.softmax(scaled, -1)
    return {
        t
        for t in range(probs.numel())
        if probs[t] > 0 and probs[probs > probs[t] * (1 + 1e-9)].sum() < p + 1e-5
    }


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-8, 8, width=32), min_size=2, max_size=40),
    temperature=st.floats(0.05, 4.0),
    k=st.integers(-1, 12),
    p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32),
)
def test_filtered_sampling_never_leaves_the_allowed_set(
    logits: list[float], temperature: float, k: int, p: float, seed: int
) -> None:
    row = torch.tensor(logits)
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p)
    counts = draw(params, n=300, logits=row, seed=seed)
    drawn = {t for t in range(row.numel()) if counts[t] > 0}
    assert drawn <= allowed_tokens(row, temperature, k, p)


def test_top_k_then_top_p() -> None:
    # top_k=4 keeps {0, 3, 6, 1}; top_p=0.8 of that renormalised set keeps its top three.
    counts = draw(SamplingParams(temperature=1.0, top_k=4, top_p=0.8))
    kept = top_k_set(4)
    probs = renormalised(torch.tensor([t in kept for t in range(V)], dtype=torch.float32))
    ordered = probs.argsort(descending=True).tolist()
    assert probs[ordered[:2]].sum() < 0.8 <= probs[ordered[:3]].sum()
    nucleus3 = torch.tensor([t in ordered[:3] for t in range(V)], dtype=torch.float32)
    assert_matches(counts, renormalised(nucleus3))


def test_mixed_batch_gives_each_row_its_own_behaviour() -> None:
    greedy = SamplingParams(temperature=0)
    top1 = SamplingParams(temperature=1.0, top_k=1)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    free = SamplingParams(temperature=1.0)
    logits = torch.randn(40, 4, V, generator=torch.Generator().manual_seed(9))  # (steps, B, V)

    rows = [seq(greedy), seq(top1), seq(seeded), seq(free)]
    generator = torch.Generator().manual_seed(0)
    batched = [sample(step.clone(), rows, generator) for step in logits]

    alone = seq(seeded)  # the seeded row on its own, with a fresh stream of the same seed
    alone_tokens = [sample(step[2:3].clone(), [alone])[0] for step in logits]
    argmax = logits.argmax(-1)  # (steps, B)
    assert [b[0] for b in batched] == argmax[:, 0].tolist()
    assert [b[1] for b in batched] == argmax[:, 1].tolist()
    assert [b[2] for b in batched] == alone_tokens
    assert [b[2] for b in batched] != argmax[:, 2].tolist()  # it did sample
    assert [b[3] for b in batched] != argmax[:, 3].tolist()
    # Sampling with the shared stream does not disturb a seeded row, and vice versa.
    other = seq(seeded)
    mixed = [
        sample(step[[3, 2, 3]].clone(), [seq(free), other, seq(free)], generator)[1]
        for step in logits
    ]
    assert mixed == alone_tokens


def test_unseeded_rows_follow_the_engine_generator() -> None:
    params = SamplingParams(temperature=1.0)
    logits = LOGITS.expand(64, -1).clone()

    def run(seed: int) -> list[int]:
        seqs = [seq(params) for _ in range(64)]
        return sample(logits, seqs, torch.Generator().manual_seed(seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


# --- through the engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", num_blocks=64, seed=0)


PROMPTS = ["The tide comes in", "A quiet morning", "def add(a, b):", "Bread rises because"]


def test_same_seed_same_tokens_whatever_shares_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded)[0].token_ids
    others = [
        SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.9, seed=7, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=1.3, top_k=50, max_tokens=20, ignore_eos=True),
    ]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    batched = llm.generate(prompts, [others[0], seeded, others[1], others[2]])
    assert batched[1].token_ids == alone
    assert len(alone) == 12
    # And again, after the engine's own stream has moved on.
    assert llm.generate([PROMPTS[0]], seeded)[0].token_ids == alone


def test_different_seeds_differ(llm: LLM) -> None:
    outs = llm.generate(
        [PROMPTS[0]] * 3,
        [
            SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True)
            for s in (1, 2, 1)
        ],
    )
    assert outs[0].token_ids != outs[1].token_ids
    assert outs[0].token_ids == outs[2].token_ids
