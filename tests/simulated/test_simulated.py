"""Simulated nodes behind the real coordinator: requests complete with the deterministic
tokens, streams neither skip nor repeat, a decode node's step takes the profile's time,
and the node units keep their block accounting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from disagg.client import AsyncClient
from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.serve import ServedCluster, ServeOptions
from disagg.sim.latency import load_profile
from disagg.simulated.base import SimSpec

PROFILE = Path(__file__).parents[2] / "bench" / "profiles" / "distserve_opt13b_a100.json"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    served = ServedCluster(
        ServeOptions(
            port=0, simulated=True, latency_profile=str(PROFILE), prefill=1, decode=2,
            max_num_seqs=64, log_dir=str(tmp_path_factory.mktemp("logs")),
        )
    ).start()  # fmt: skip
    yield served
    served.stop(drain_timeout=5)


def spec() -> SimSpec:
    return SimSpec(latency=load_profile(PROFILE).model(1), vocab_size=4096, eos_token_ids=(2,))


def test_simulated_tokens_are_deterministic_in_range_and_never_eos():
    s = spec()
    tokens = [s.token(rid, i) for rid in range(1, 40) for i in range(50)]
    assert tokens == [spec().token(rid, i) for rid in range(1, 40) for i in range(50)]
    assert all(0 <= t < 4096 and t != 2 for t in tokens)
    assert len(set(tokens)) > 1000  # not a constant


def test_requests_complete_with_the_simulated_tokens_streams_and_all(cluster):
    async def main():
        async with AsyncClient(cluster.client_address, timeout=60) as client:
            plain = await asyncio.gather(
                *(client.generate([5] * 16, client_id=f"c{i % 3}", max_tokens=6) for i in range(40))
            )
            stream = client.stream("hello there", client_id="s", max_tokens=9)
            chunks = [c async for c in stream]
            return plain, chunks, stream.completion

    plain, chunks, done = asyncio.run(main())
    assert len(plain) == 40
    config = ModelConfig.from_dir(cluster.model_dir)
    s = SimSpec(
        latency=load_profile(PROFILE).model(1),
        vocab_size=config.vocab_size,
        eos_token_ids=tuple(config.eos_token_ids),
    )
    # Every completion is one request's deterministic sequence: token i of some rid.
    sequences = {tuple(s.token(rid, i) for i in range(6)) for rid in range(1, 200)}
    for c in plain:
        assert c.finish_reason == "length" and tuple(c.token_ids) in sequences
        assert c.nodes.prefill == "prefill-0" and c.nodes.decode in ("decode-0", "decode-1")
    assert len({tuple(c.token_ids) for c in plain}) > 30  # distinct requests, distinct tokens
    index = 0
    for chunk in chunks:
        assert chunk.index == index
        index += len(chunk.token_ids)
    assert [t for c in chunks for t in c.token_ids] == done.token_ids and len(done.token_ids) == 9
    # Simulated nodes detokenise as real ones do: the texts add up to the whole decode.
    tokenizer = Tokenizer.from_dir(cluster.model_dir)
    assert "".join(c.text for c in chunks) == done.text == tokenizer.decode(done.token_ids)
    assert all(c.text == tokenizer.decode(c.token_ids) for c in plain)  # not streamed too


def test_a_decode_step_takes_the_profiles_time(cluster):
    """The TPOT a lone request sees is the profile's decode time at batch 1 (within the
    timer and messaging slack of a shared machine)."""
    model = load_profile(PROFILE).model(1)

    async def main():
        async with AsyncClient(cluster.client_address, timeout=60) as client:
            return await client.generate([7] * 16, client_id="timed", max_tokens=12)

    out = asyncio.run(main())
    expected = model.decode_time(1, 16 + 6)
    assert out.timings.tpot >= expected * 0.95
    assert out.timings.tpot < expected * 3  # no step is skipped or run twice


def test_serve_simulated_needs_a_profile_and_the_flags_reach_the_options():
    import argparse

    from disagg.errors import ConfigError
    from disagg.serve_cli import add_serve_arguments, serve_options

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = ["--simulated", "--latency-profile", str(PROFILE), "--decode", "3"]
    options = serve_options(parser.parse_args([*args, "--max-num-seqs", "128"]))
    assert (options.simulated, options.decode, options.max_num_seqs) == (True, 3, 128)
    assert options.latency_profile == str(PROFILE)
    with pytest.raises(ConfigError, match="latency-profile"):
        serve_options(parser.parse_args(["--simulated"]))
