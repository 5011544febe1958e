"""Streaming text: the text each new token adds, computed where the tokens are made (the
nodes, which hold the tokenizer and scale with the cluster), without decoding the whole
output each step and without ever sending half a UTF-8 character (byte-level BPE splits
characters across tokens; the decoder then ends in U+FFFD until the rest comes).

The stream's one invariant: the texts sent for a request, in order, add up to the
decoding of its whole output. A stream can move between processes (prefill node to
decode node, a dead decode node to another): the new owner rebuilds it from the output
tokens so far and the number of characters already sent (:meth:`TextStream.resume`),
and goes on from exactly that character, so the client's text never repeats or skips.
"""

from __future__ import annotations

import logging

from disagg.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_CONTEXT = 6  # tokens decoded before the unsent ones, so merges at the seam come out right
# The window slides once it spans this many tokens; until then the last decode of the
# window is the next call's "before", so a token costs one decode, not two.
_WINDOW = 4 * _CONTEXT
# At most this many tokens at the end of an output may be an unfinished character (a
# UTF-8 character is at most 4 bytes, so 4 byte tokens; a little more for safety).
_MAX_PARTIAL = 8


class TextStream:
    """One request's output text, as it is streamed.

    ``add(output_ids)`` after each new token returns the text the new tokens add (``""``
    while a character is unfinished); ``finish(output_ids)`` at the end returns all that
    was not sent yet. ``sent_chars`` counts the characters returned so far.
    """

    __slots__ = ("_before", "_pending", "_prefix", "_sent_upto", "_skip", "sent_chars", "tokenizer")

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._sent_upto = 0  # tokens whose text has been sent
        self._prefix = 0  # where the decoding window starts
        self._before: str | None = ""  # decode(window up to _sent_upto); None: not known
        self._pending = ""  # text of tokens before _sent_upto not sent yet (after resume)
        self._skip = 0  # characters already sent beyond _sent_upto's text (after resume)
        self.sent_chars = 0  # characters sent so far

    @classmethod
    def resume(
        cls, tokenizer: Tokenizer | None, output_ids: list[int], sent_chars: int
    ) -> TextStream:
        """The stream of a request whose first ``len(output_ids)`` tokens were produced
        elsewhere and whose first ``sent_chars`` characters were sent: the next text
        returned starts at character ``sent_chars`` of the output's decoding. Costs one
        decode of the output so far (once per hand-off)."""
        stream = cls(tokenizer)
        stream.sent_chars = sent_chars
        if tokenizer is None or not output_ids:
            return stream
        # Up to the last token whose text is complete (the rest waits for more tokens).
        upto = len(output_ids)
        floor = max(0, upto - _MAX_PARTIAL)
        while upto > floor and tokenizer.decode(
            output_ids[max(0, upto - _CONTEXT) : upto]
        ).endswith("\ufffd"):
            upto -= 1
        text = tokenizer.decode(output_ids[:upto])
        stream._sent_upto = upto
        stream._prefix = max(0, upto - _CONTEXT)
        stream._before = None
        if sent_chars <= len(text):
            stream._pending = text[sent_chars:]
        else:  # more was sent than these tokens decode to: do not send it twice
            log.debug("resumed text: %d characters sent, %d decoded", sent_chars, len(text))
            stream._skip = sent_chars - len(text)
        return stream

    def add(self, output_ids: list[int]) -> str:
        """The text added by ``output_ids[self._sent_upto:]`` (may be empty: held back)."""
        if self.tokenizer is None or len(output_ids) <= self._sent_upto:
            return ""
        before = self._before
        if before is None:
            before = self._before = self.tokenizer.decode(
                output_ids[self._prefix : self._sent_upto]
            )
        after = self.tokenizer.decode(output_ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) < len(before):
            return self._take_pending()
        self._sent_upto = len(output_ids)
        delta = after[len(before) :]
        if self._sent_upto - self._prefix > _WINDOW:
            self._prefix, self._before = self._sent_upto - _CONTEXT, None
        else:
            self._before = after
        if self._pending:
            delta, self._pending = self._pending + delta, ""
        if self._skip:
            cut = min(self._skip, len(delta))
            delta, self._skip = delta[cut:], self._skip - cut
        self.sent_chars += len(delta)
        return delta

    def finish(self, output_ids: list[int]) -> str:
        """At the end: everything of the whole output's decoding not sent yet (bytes that
        never completed a character decode to U+FFFD and are sent now)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(output_ids)
        rest = text[self.sent_chars :]
        self.sent_chars = max(self.sent_chars, len(text))
        self._pending, self._skip = "", 0
        return rest

    def advance(self, output_ids: list[int], finished: bool) -> str:
        """The text of the tokens just appended to ``output_ids``: :meth:`finish` when
        they are the request's last, else :meth:`add`."""
        return self.finish(output_ids) if finished else self.add(output_ids)

    def _take_pending(self) -> str:
        pending, self._pending = self._pending, ""
        self.sent_chars += len(pending)
        return pending
