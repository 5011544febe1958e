"""Chat messages -> prompt text through the model's own chat template (Jinja2).

A checkpoint ships its template as a Jinja2 string: in ``tokenizer_config.json``
(``chat_template``) for a Hugging Face directory, in the metadata key
``tokenizer.chat_template`` for a GGUF file. Templates are written against the
environment Hugging Face renders them in (trimmed blocks, ``loopcontrols``, a
``tojson`` filter that keeps non-ASCII text, ``raise_exception``, ``strftime_now``), so
that is the environment here; it is sandboxed, because a template is data from a file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from disagg.errors import CheckpointError, InvalidRequestError


class TemplateError(Exception):
    """Raised by a template itself (``raise_exception``): the messages break its rules."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """One model's chat template, compiled once.

    ``render`` takes OpenAI-style messages (``{"role": ..., "content": ...}``, content a
    string or a list of ``{"type": "text", "text": ...}`` parts) and returns the prompt
    text, ending with the assistant's turn opened when ``add_generation_prompt``.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = ""):
        from jinja2 import TemplateSyntaxError

        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as exc:
            raise CheckpointError(
                origin or "chat template", f"not a valid template ({exc})"
            ) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt for ``messages``; an ``InvalidRequestError`` naming ``messages`` when
        the template refuses them (a role it does not know, a bad order)."""
        plain = [_plain_message(m, i) for i, m in enumerate(messages)]
        try:
            return self._template.render(
                messages=plain,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError as exc:
            raise InvalidRequestError(
                "messages", f"the model's chat template refused them: {exc}"
            ) from exc

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The template in a Hugging Face directory's ``tokenizer_config.json`` (or its
        ``chat_template.jinja``), or None when it has none."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(str(config_path), f"not valid JSON ({exc})") from exc
        source: Any = config.get("chat_template")
        origin = str(config_path)
        jinja_path = model_dir / "chat_template.jinja"
        if source is None and jinja_path.is_file():
            source, origin = jinja_path.read_text(), str(jinja_path)
        if isinstance(source, list):  # several named templates: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not source:
            return None
        if not isinstance(source, str):
            raise CheckpointError(origin, "chat_template is not a string")
        return cls(
            source,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            origin=origin,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> ChatTemplate | None:
        """The template in a GGUF file's metadata (``tokenizer.chat_template``), or None."""
        from disagg.engine.gguf_checkpoint import open_gguf, read_metadata
        from disagg.engine.gguf_tokenizer import tokenizer_config

        config = tokenizer_config(read_metadata(open_gguf(Path(path))))
        source = config.get("chat_template")
        if not source:
            return None
        return cls(
            source,
            bos_token=config.get("bos_token", ""),
            eos_token=config.get("eos_token", ""),
            origin=f"{path}: tokenizer.chat_template",
        )


def load_chat_template(model: str | Path) -> ChatTemplate | None:
    """The chat template of the model ``--model`` names (a Hugging Face directory, a
    ``.gguf`` file, a registry name or ``tiny``), or None when it ships none. Reads the
    template only: converts no weights."""
    from disagg.engine.model_source import locate_model

    where = locate_model(model)
    if where.is_file():
        return ChatTemplate.from_gguf(where)
    return ChatTemplate.from_model_dir(where)


def _token_text(token: Any) -> str:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return str(token.get("content", ""))
    return "" if token is None else str(token)


def _plain_message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise InvalidRequestError(f"messages[{index}]", "must be an object with role and content")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequestError(f"messages[{index}].role", "must be a non-empty string")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts are served
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise InvalidRequestError(
                    f"messages[{index}].content[{j}]", "only parts of type 'text' are supported"
                )
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise InvalidRequestError(
            f"messages[{index}].content", "must be a string or a list of parts"
        )
    plain = dict(message)
    plain["content"] = content
    return plain
