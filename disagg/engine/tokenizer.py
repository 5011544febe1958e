"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the `tokenizers` library),
and the end-of-sequence ids the checkpoint declares."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from disagg.errors import CheckpointError


class Tokenizer:
    def __init__(self, backend: _HFTokenizer):
        self._backend = backend

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        """The directory's tokenizer, or None when it has no ``tokenizer.json`` (then
        only token-id prompts can be served)."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception on bad files
            raise CheckpointError(str(path), f"not a valid tokenizer file ({exc})") from exc
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids as the checkpoint's own tokenizer produces them, special tokens
        (such as a leading BOS) included."""
        return self._backend.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)


def eos_token_ids(model_dir: str | Path, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """End-of-sequence ids: ``generation_config.json``'s when it names any (chat models
    often list several there), else ``config.json``'s."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return config_eos
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(str(path), f"not valid JSON ({exc})") from exc
    eos = raw.get("eos_token_id")
    ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ids or config_eos
