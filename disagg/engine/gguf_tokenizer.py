"""A GGUF file's tokenizer as a `tokenizers` Tokenizer, and its tokenizer settings.

GGUF stores the vocabulary (``tokenizer.ggml.tokens``), the BPE merges, a type per token
(normal, control, user-defined, ...) and the name of the pre-tokenizer llama.cpp applies
(``tokenizer.ggml.pre``), whose split rules live in llama.cpp's source rather than the
file. Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, used by Llama 3, Qwen2, SmolLM
and most recent models) is supported with the pre-tokenizers listed in
:data:`PRE_TOKENIZERS`, and SentencePiece BPE (``"llama"``: Llama 2, Mistral, TinyLlama);
others are refused by name. Both are built as transformers builds them from a GGUF file
(the tests compare the two).
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
    if kind == "gpt2":
        tokenizer = _byte_level(meta, tokens, source)
    elif kind == "llama":
        tokenizer = _sentencepiece(meta, tokens, source)
        # llama.cpp (and transformers) add BOS to SentencePiece text unless told not to.
        meta = {"tokenizer.ggml.add_bos_token": True, **meta}
    else:
        raise CheckpointError(
            source,
            f"tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
            "'llama' SentencePiece BPE)",
        )
    # Control tokens (<|im_start|>, <|endoftext|>) are matched whole and skipped when
    # decoding; user-defined ones (<think>) are matched whole but kept in the text.
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    if types and len(types) != len(tokens):
        raise CheckpointError(source, "tokenizer.ggml.token_type and tokens differ in length")
    kinds = list(zip(tokens, types, strict=True)) if types else []
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


def _vocab(tokens: list[str], source: str) -> dict[str, int]:
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(source, "tokenizer.ggml.tokens lists a token twice")
    return vocab


def _byte_level(meta: dict[str, Any], tokens: list[str], source: str) -> Tokenizer:
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            source,
            f"pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}",
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(
        models.BPE(vocab=_vocab(tokens, source), merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(meta: dict[str, Any], tokens: list[str], source: str) -> Tokenizer:
    """SentencePiece BPE (Llama 2, Mistral, TinyLlama): words marked with "▁", bytes
    outside the vocabulary spelled as <0xNN> tokens. Files without merges carry a score
    per token instead; the merges are every split of a token into two tokens, the
    highest-scoring result first (SentencePiece merges the best-scoring pair)."""
    vocab = _vocab(tokens, source)
    listed = meta.get("tokenizer.ggml.merges")
    if listed:
        merges = [tuple(m.split(" ", 1)) for m in listed]
    else:
        scores = list(meta.get("tokenizer.ggml.scores") or [])
        if len(scores) != len(tokens):
            raise CheckpointError(source, "a SentencePiece vocabulary needs tokenizer.ggml.scores")
        merges = _merges_from_scores(tokens, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    ranked: list[tuple[float, int, int, int, int, str, str]] = []
    for merged, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                # Best score first; among equals, longer left then right pieces, then
                # vocabulary order.
                ranked.append(
                    (-score, -len(left), -len(right), vocab[left], vocab[right], left, right)
                )
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


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
