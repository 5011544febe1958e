"""Streaming text: the text a chunk of new tokens adds, without decoding the whole
output each time and without ever sending half a UTF-8 character (byte-level BPE
splits characters across tokens; the decoder then ends in U+FFFD until the rest comes)."""

from __future__ import annotations

from disagg.engine.tokenizer import Tokenizer

_CONTEXT = 6  # tokens decoded before the unsent ones, so merges at the seam come out right
# The window slides once it spans this many tokens; until then the last decode of the
# window is the next call's "before", so a chunk costs one decode, not two.
_WINDOW = 4 * _CONTEXT


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._sent_upto = 0  # tokens whose text has been sent
        self._prefix = 0  # where the decoding window starts
        self._before: str | None = ""  # decode(window up to _sent_upto); None: not known
        self.sent_chars = 0  # characters sent so far

    def delta(self, token_ids: list[int]) -> str:
        """The text added by ``token_ids[self._sent_upto:]`` (may be empty: held back)."""
        if self.tokenizer is None or len(token_ids) <= self._sent_upto:
            return ""
        before = self._before
        if before is None:
            before = self._before = self.tokenizer.decode(token_ids[self._prefix : self._sent_upto])
        after = self.tokenizer.decode(token_ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""
        self._sent_upto = len(token_ids)
        delta = after[len(before) :]
        if self._sent_upto - self._prefix > _WINDOW:
            self._prefix, self._before = self._sent_upto - _CONTEXT, None
        else:
            self._before = after
        self.sent_chars += len(delta)
        return delta

    def rest(self, full_text: str) -> str:
        """At the end: what of ``full_text`` (the whole output decoded) was held back
        (bytes that never completed a character decode to U+FFFD and are sent now)."""
        rest = full_text[self.sent_chars :]
        self.sent_chars = len(full_text)
        return rest
