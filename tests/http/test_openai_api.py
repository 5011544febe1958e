"""The gateway through the official ``openai`` package: outputs equal the offline
engine's (itself equal to transformers'), streams join to the full text, the chunks and
replies parse as OpenAI's own types, and the chat prompt equals transformers' own
``apply_chat_template``."""

from __future__ import annotations

import asyncio

import openai
import pytest

from disagg import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "a b c d e f g"]


@pytest.fixture(scope="module")
def name(model_dir) -> str:
    return str(model_dir)


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60) as c:
        yield c


def offline_greedy(offline, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return offline.generate(prompts, [params] * len(prompts))


def test_models_lists_the_served_model(client, name):
    models = client.models.list()
    assert [m.id for m in models.data] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_greedy_completions_equal_the_offline_engine(client, name, offline):
    expected = offline_greedy(offline, PROMPTS, 12)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        out = client.completions.create(
            model=name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        choice = out.choices[0]
        assert choice.text == want.text
        assert choice.finish_reason == "length"
        assert out.usage.completion_tokens == len(want.token_ids) == 12
        assert out.usage.prompt_tokens == len(want.prompt_token_ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + 12


@pytest.mark.parametrize("form", ["ids", "list of ids", "list of one string"])
def test_prompt_forms_as_vllm_accepts_them(client, name, offline, form):
    ids = [5, 6, 7, 8, 9, 10, 11]
    prompt = {"ids": ids, "list of ids": [ids], "list of one string": [PROMPTS[0]]}[form]
    want = offline_greedy(offline, [PROMPTS[0] if form.endswith("string") else ids], 6)[0]
    out = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
    assert out.choices[0].text == want.text


def test_seeded_sampling_equals_the_offline_engine(client, name, offline):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    want = offline.generate([PROMPTS[1]], [params])[0]
    out = client.completions.create(
        model=name, prompt=PROMPTS[1], max_tokens=10, temperature=0.9, top_p=0.9, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.choices[0].text == want.text


def test_stop_string_ends_with_finish_reason_stop(client, name, offline):
    full = offline_greedy(offline, [PROMPTS[1]], 16)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    params = SamplingParams(max_tokens=16, temperature=0, stop=[stop], ignore_eos=True)
    want = offline.generate([PROMPTS[1]], [params])[0]
    out = client.completions.create(
        model=name, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == want.text and stop not in want.text


def test_streamed_deltas_join_to_the_non_streamed_text(client, name):
    kwargs = dict(model=name, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # usage only when asked for


def test_stream_include_usage_sends_a_last_usage_chunk(client, name):
    chunks = list(
        client.completions.create(
            model=name, prompt=PROMPTS[2], max_tokens=7, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert all(c.usage is None for c in body)


@pytest.mark.slow  # imports transformers
def test_chat_prompt_is_transformers_apply_chat_template(client, name, model_dir, offline):
    import transformers

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = offline_greedy(offline, [ids], 9)[0]
    out = client.chat.completions.create(
        model=name, messages=messages, max_completion_tokens=9, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    streamed = client.chat.completions.create(
        model=name, messages=messages, max_tokens=9, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-2].choices[0].finish_reason == "length"


def test_async_client_serves_concurrent_streams(base_url, name, offline):
    expected = offline_greedy(offline, PROMPTS, 8)

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as c:

            async def one(prompt):
                stream = await c.completions.create(
                    model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                return "".join([chunk.choices[0].text async for chunk in stream])

            return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(run()) == [o.text for o in expected]
