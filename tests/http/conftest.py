"""A served system with its OpenAI-compatible gateway, for the HTTP tests.

The model is the embedded tiny model (random weights) in a directory of its own with a
chat template added, since the tiny model ships none: the same weights, so outputs
equal ``LLM("tiny")``'s. SmolLM2 (a real chat model) is served the same way by passing
its name or file as ``model`` to ``served_with_gateway``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from disagg import LLM
from disagg.engine.tiny_model import tiny_model_path
from disagg.serve import ServedCluster
from tests.runtime.conftest import NUM_BLOCKS, start_cluster

# A Llama-3-like template: it writes the BOS itself, as real ones do, so a gateway that
# let the tokenizer add another would be caught by the comparison with transformers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def chat_model_dir(path: Path) -> Path:
    """The tiny model's files, with ``chat_template`` in its tokenizer config."""
    source = tiny_model_path()
    path.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name == "model.safetensors":
            (path / f.name).symlink_to(f)
        else:
            shutil.copy(f, path / f.name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def served_with_gateway(tmp: Path, model: str, **options) -> ServedCluster:
    return start_cluster(tmp, model=model, http_port=0, metrics_port=0, **options)


# One served system for the whole directory (starting one costs seconds of CPU); the
# tests that disturb it (API keys, a killed node) start their own.
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return chat_model_dir(tmp_path_factory.mktemp("chat-model") / "tiny-chat")


@pytest.fixture(scope="session")
def served(tmp_path_factory, model_dir):
    cluster = served_with_gateway(tmp_path_factory.mktemp("served"), str(model_dir))
    yield cluster
    cluster.stop(drain_timeout=5)


@pytest.fixture(scope="session")
def base_url(served) -> str:
    return served.gateway.url + "/v1"


@pytest.fixture(scope="session")
def offline() -> LLM:
    return LLM("tiny", num_blocks=NUM_BLOCKS)
