"""The chat template renders as transformers' own ``apply_chat_template`` does."""

from __future__ import annotations

import json

import pytest

from disagg.engine.chat_template import ChatTemplate
from disagg.errors import CheckpointError, InvalidRequestError

# A ChatML template of the shape SmolLM2 and Qwen2 ship (system turn defaulted, a
# template-side error for an unknown role).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word. Ünïcödé ok."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome"},
        {"role": "user", "content": "And Spain?"},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHATML
    path = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(path)
    return path, tok


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers(hf_tokenizer_dir, messages, add_generation_prompt):
    path, tok = hf_tokenizer_dir
    ours = ChatTemplate.from_model_dir(path)
    assert ours is not None
    theirs = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == theirs


def test_content_parts_join_as_text(hf_tokenizer_dir):
    path, _ = hf_tokenizer_dir
    ours = ChatTemplate.from_model_dir(path)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert ours.render(parts) == ours.render([{"role": "user", "content": "ab"}])


def test_bad_messages_name_the_field(hf_tokenizer_dir):
    path, _ = hf_tokenizer_dir
    ours = ChatTemplate.from_model_dir(path)
    with pytest.raises(InvalidRequestError) as err:
        ours.render([{"role": "wizard", "content": "hi"}])
    assert err.value.field == "messages" and "unknown role wizard" in err.value.reason
    with pytest.raises(InvalidRequestError) as err:
        ours.render([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert err.value.field == "messages[0].content[0]"
    with pytest.raises(InvalidRequestError) as err:
        ours.render([{"content": "no role"}])
    assert err.value.field == "messages[0].role"


def test_no_template_and_broken_template(tmp_path):
    assert ChatTemplate.from_model_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(CheckpointError, match="not a valid template"):
        ChatTemplate.from_model_dir(tmp_path)


def test_template_is_sandboxed():
    # A template is data from a file: it must not reach Python internals.
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        evil.render([{"role": "user", "content": "x"}])
