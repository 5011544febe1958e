"""Streamed text: the chunks add up to the whole output decoded at once (the tokenizer's
own decode is the reference), whatever the chunking, never sending half a character."""

from __future__ import annotations

import random

import pytest

from disagg.coordinator.detokenize import IncrementalText
from disagg.engine.tokenizer import Tokenizer
from disagg.engine.worker import resolve_model_dir


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(resolve_model_dir("tiny"))


@pytest.mark.parametrize("seed", range(6))
def test_chunks_add_up_to_the_whole_decode(tokenizer, seed):
    rng = random.Random(seed)
    text = "".join(
        rng.choice(["naïve ", "日本語", "🙂", "x", " the ", "ß", "\n"]) for _ in range(40)
    )
    ids = tokenizer.encode(text)
    assert len(ids) > 30
    stream = IncrementalText(tokenizer)
    sent: list[str] = []
    end = 0
    while end < len(ids):
        end = min(len(ids), end + rng.choice([1, 1, 2, 3]))
        delta = stream.delta(ids[:end])
        assert "\ufffd" not in delta
        sent.append(delta)
    whole = tokenizer.decode(ids)
    assert "".join(sent) + stream.rest(whole) == whole
