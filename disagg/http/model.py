"""What the gateway knows of the served model: its name, its chat template, its
tokenizer (for chat prompts) and its context length. Read once at start-up from the
same ``--model`` the nodes load; the gateway never loads weights.

``load_chat_template`` (GGUF files and model names as well as directories) is used
when ``disagg.engine.chat_template`` has it; otherwise the directory's template.
This is the one place the gateway looks a model's template up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.engine.chat_template import ChatTemplate
from disagg.errors import CheckpointError


def model_dir_of(model: str) -> Path:
    """A directory as it is; anything else ('tiny', a name, a file) as the engine
    resolves it. Only then is the engine imported (it brings torch, seconds to load),
    so a gateway given a directory — as ``disagg serve`` gives it — starts fast."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from disagg.engine.worker import resolve_model_dir

    return resolve_model_dir(model)


def load_template(model: str) -> ChatTemplate | None:
    from disagg.engine import chat_template

    loader = getattr(chat_template, "load_chat_template", None)
    if loader is not None:
        return loader(model)
    return ChatTemplate.from_model_dir(model_dir_of(model))


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id clients put in "model"
    template: ChatTemplate | None
    tokenizer: Any  # tokenizers.Tokenizer, or None for a model without tokenizer.json
    max_context: int | None  # None: not known here (the nodes cap generation anyway)
    created: int

    @classmethod
    def load(cls, model: str, name: str | None = None) -> ServedModel:
        model_dir = model_dir_of(model)
        return cls(
            name=name or model,
            template=load_template(model),
            tokenizer=_load_tokenizer(model_dir),
            max_context=_max_context(model_dir),
            created=int(time.time()),
        )

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of ``messages`` rendered by the template. Tokenised here without
        adding special tokens, as transformers' ``apply_chat_template`` does: a template
        writes its own BOS, and the tokenizer would add a second one."""
        assert self.template is not None and self.tokenizer is not None
        text = self.template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def _max_context(model_dir: Path) -> int | None:
    # ModelConfig.max_context's rule (a sliding window caps the context), read without
    # ModelConfig, which imports torch.
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    lengths = [config.get("max_position_embeddings"), config.get("sliding_window")]
    lengths = [n for n in lengths if isinstance(n, int) and n > 0]
    return min(lengths) if lengths else None


def _load_tokenizer(model_dir: Path) -> Any:
    # The tokenizers library directly: disagg's Tokenizer.encode always adds special tokens.
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a bare Exception on bad files
        raise CheckpointError(str(path), f"not a valid tokenizer file ({exc})") from exc
