"""Streamed text: the texts add up to the whole output decoded at once (the tokenizer's
own decode is the reference), whatever the chunking, never sending half a character,
and a stream handed to another process (prefill node -> decode node, a dead decode
node -> another) goes on from exactly the character the client has."""

from __future__ import annotations

import random

import pytest

from disagg.engine.detokenize import TextStream
from disagg.engine.tokenizer import Tokenizer
from disagg.engine.worker import resolve_model_dir

PIECES = ["naïve ", "日本語", "🙂", "x", " the ", "ß", "\n"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(resolve_model_dir("tiny"))


def _ids(tokenizer: Tokenizer, rng: random.Random) -> list[int]:
    ids = tokenizer.encode("".join(rng.choice(PIECES) for _ in range(40)))
    assert len(ids) > 30
    return ids


def _run(stream: TextStream, ids: list[int], start: int, end: int, rng: random.Random) -> list[str]:
    """Feeds ``ids[start:end]`` in random chunks; the last chunk ends the request when
    ``end`` is the whole output."""
    sent: list[str] = []
    upto = start
    while upto < end:
        upto = min(end, upto + rng.choice([1, 1, 2, 3]))
        delta = stream.advance(ids[:upto], finished=upto == len(ids))
        if upto < len(ids):
            assert "\ufffd" not in delta
        sent.append(delta)
    return sent


@pytest.mark.parametrize("seed", range(6))
def test_chunks_add_up_to_the_whole_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = _ids(tokenizer, rng)
    stream = TextStream(tokenizer)
    sent = _run(stream, ids, 0, len(ids), rng)
    whole = tokenizer.decode(ids)
    assert "".join(sent) == whole and stream.sent_chars == len(whole)


@pytest.mark.parametrize("seed", range(12))
def test_a_stream_handed_over_goes_on_from_the_character_the_client_has(tokenizer, seed):
    """One node streams the first k tokens (some of a character may be held back); another
    rebuilds the stream from the k tokens and the characters sent, and the client's text
    is the whole decode, nothing repeated or skipped, whatever k (every split point of
    a text with multi-byte characters is tried across seeds)."""
    rng = random.Random(seed)
    ids = _ids(tokenizer, rng)
    whole = tokenizer.decode(ids)
    for k in range(1, len(ids)):
        first = TextStream(tokenizer)
        sent = _run(first, ids, 0, k, rng)
        assert first.sent_chars == sum(map(len, sent))
        second = TextStream.resume(tokenizer, ids[:k], first.sent_chars)
        sent += _run(second, ids, k, len(ids), rng)
        assert "".join(sent) == whole, f"handed over after {k} tokens"


def test_handed_over_twice_right_after_the_first_token(tokenizer):
    """As a request goes: prefill node (first token), decode node, a second decode node."""
    ids = tokenizer.encode("日本語🙂 naïve ß")
    prefill = TextStream(tokenizer)
    sent = [prefill.advance(ids[:1], finished=False)]
    decode = TextStream.resume(tokenizer, ids[:1], prefill.sent_chars)
    sent += [decode.advance(ids[:n], finished=False) for n in range(2, 5)]
    other = TextStream.resume(tokenizer, ids[:4], sum(map(len, sent)))
    sent += [other.advance(ids[:n], finished=n == len(ids)) for n in range(5, len(ids) + 1)]
    assert "".join(sent) == tokenizer.decode(ids)


def test_what_was_sent_beyond_the_tokens_text_is_not_sent_again(tokenizer):
    """A client that has more characters than the handed-over tokens decode to (a
    tokenizer whose decode is not prefix-stable could do that) gets the rest only."""
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog")
    whole = tokenizer.decode(ids)
    have = len(tokenizer.decode(ids[:5])) + 2
    stream = TextStream.resume(tokenizer, ids[:5], have)
    rest = [stream.advance(ids[:n], finished=n == len(ids)) for n in range(6, len(ids) + 1)]
    assert whole[:have] + "".join(rest) == whole


def test_without_a_tokenizer_there_is_no_text():
    stream = TextStream.resume(None, [1, 2, 3], 0)
    assert stream.advance([1, 2, 3, 4], finished=False) == ""
    assert stream.advance([1, 2, 3, 4, 5], finished=True) == ""
