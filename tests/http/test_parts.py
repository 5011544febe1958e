"""The gateway's parts without a served system: the coordinator connections kept per
API key, the command-line wiring, and the streamed chunks against the openai package's
own types."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from disagg.errors import ConfigError
from disagg.http.identity import ClientPool
from disagg.http.schemas import Usage
from disagg.http.streaming import ChunkFormat
from disagg.serve_cli import add_serve_arguments, serve_options


def test_the_pool_keeps_one_client_per_key_and_closes_the_least_recent_idle_one():
    async def run():
        # ZeroMQ connects lazily: no coordinator is needed to make clients.
        pool = ClientPool("tcp://127.0.0.1:9", timeout=1, max_clients=2)
        a = pool.get("key-a")
        assert pool.get("key-a") is a
        b = pool.get("key-b")
        pool.get("key-a")  # a is now the most recently used
        c = pool.get("key-c")
        assert len(pool) == 2
        await asyncio.sleep(0)  # the eviction's close runs as a task
        assert b.closed and not a.closed and not c.closed
        assert pool.get("key-b") is not b  # a fresh one
        await pool.close()
        assert a.closed and c.closed

    asyncio.run(run())


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p.parse_args(list(argv))


def test_serve_http_port_reaches_the_options_and_is_checked():
    assert serve_options(parse()).http_port is None
    assert serve_options(parse("--http-port", "0")).http_port == 0
    with pytest.raises(ConfigError) as e:
        serve_options(parse("--http-port", "70000"))
    assert e.value.field == "http_port"


def events(raw: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]


def test_chunks_parse_as_the_openai_packages_types():
    chat = ChunkFormat.of("chatcmpl-1", "m", 7, chat=True, include_usage=True)
    raw = chat.role() + chat.text('say "hi"\n') + chat.finish("length")
    raw += chat.usage(Usage.of(3, 2))
    chunks = [ChatCompletionChunk.model_validate(e) for e in events(raw)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.content == 'say "hi"\n'
    assert chunks[2].choices[0].finish_reason == "length"
    assert chunks[3].choices == [] and chunks[3].usage.total_tokens == 5
    text = ChunkFormat.of("cmpl-1", "m", 7, chat=False, include_usage=False)
    one, last = events(text.text("é") + text.finish("stop"))
    # The SDK's Completion type wants a finish reason (streamed chunks have null until
    # the last): the last chunk validates, and the others have its shape.
    assert Completion.model_validate(last).choices[0].finish_reason == "stop"
    assert one["choices"][0] == {**last["choices"][0], "text": "é", "finish_reason": None}
    assert "usage" not in one
