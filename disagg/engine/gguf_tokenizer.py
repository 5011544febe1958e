"""A GGUF file's tokenizer as a `tokenizers` Tokenizer, and its tokenizer settings.

GGUF stores the vocabulary (``tokenizer.ggml.tokens``), the BPE merges, a type per token
(normal, control, user-defined, ...) and the name of the pre-tokenizer llama.cpp applies
(``tokenizer.ggml.pre``), whose split rules live in llama.cpp's source rather than the
file. Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, used by Llama 3, Qwen2, SmolLM
and most recent models) is supported, with the pre-tokenizers listed in
:data:`PRE_TOKENIZERS`; others are refused by name.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from disagg.errors import CheckpointError

# llama.cpp's token types (llama_token_type).
CONTROL = 3
USER_DEFINED = 4

# llama.cpp's split rules, by the name the file gives.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# What each family is: "gpt2" = GPT-2's own split (the byte-level pre-tokenizer's regex),
# "digits+gpt2" = every digit on its own, then GPT-2's split, "split:<regex>" = one regex.
PRE_TOKENIZERS: dict[str, str] = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "llama-bpe": f"split:{_LLAMA3_SPLIT}",
    "llama3": f"split:{_LLAMA3_SPLIT}",
    "smaug-bpe": f"split:{_LLAMA3_SPLIT}",
    "qwen2": f"split:{_QWEN2_SPLIT}",
    "deepseek-r1-qwen": f"split:{_QWEN2_SPLIT}",
}


def build_tokenizer(meta: dict[str, Any], source: str) -> Tokenizer | None:
    """The file's tokenizer, or None when the file has no vocabulary (then only token-id
    prompts can be served). Unsupported tokenizer models or pre-tokenizers are refused."""
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        return None
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            source, f"tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            source,
            f"pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}",
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(source, "tokenizer.ggml.tokens lists a token twice")
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are matched whole and skipped when
    # decoding; user-defined ones (<think>) are matched whole but kept in the text.
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    if types and len(types) != len(tokens):
        raise CheckpointError(source, "tokenizer.ggml.token_type and tokens differ in length")
    kinds = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in kinds if k == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, k in kinds if k == USER_DEFINED]
    )
    post = _post_processor(meta, tokens, source)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` fields the file defines: the chat template and the
    special tokens' text (the template refers to them as ``bos_token``/``eos_token``)."""
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[name] = tokens[int(token_id)]
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return config


def _pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits+gpt2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    assert family.startswith("split:"), family
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family.removeprefix("split:")), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _post_processor(
    meta: dict[str, Any], tokens: list[str], source: str
) -> processors.PostProcessor | None:
    """BOS before (and EOS after) each text when the file asks for it."""
    wanted = [
        (flag, meta.get(f"tokenizer.ggml.{key}"))
        for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id"))
        if meta.get(f"tokenizer.ggml.{flag}")
    ]
    if not wanted:
        return None
    specials: dict[str, tuple[str, int]] = {}
    for flag, token_id in wanted:
        if token_id is None or not 0 <= int(token_id) < len(tokens):
            raise CheckpointError(source, f"tokenizer.ggml.{flag} is set but its token id is not")
        specials[flag] = (tokens[int(token_id)], int(token_id))

    def sequence(piece: str, type_id: int) -> str:
        parts = [f"{piece}:{type_id}"]
        if "add_bos_token" in specials:
            parts.insert(0, f"{specials['add_bos_token'][0]}:{type_id}")
        if "add_eos_token" in specials:
            parts.append(f"{specials['add_eos_token'][0]}:{type_id}")
        return " ".join(parts)

    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
        special_tokens=list(set(specials.values())),
    )
