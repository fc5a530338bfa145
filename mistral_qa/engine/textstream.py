"""Generated token ids -> text that is safe to stream: whole characters only, nothing that could
still turn out to be the start of a stop string, and no trailing whitespace (answers end trimmed,
and what was streamed must stay a prefix of the final text)."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._emitted = 0

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Take all tokens so far; return (new text to show, whether a stop string ended the answer)."""
        # Decoding the whole answer each step is what keeps multi-token characters and
        # sentencepiece spacing right; answers are short enough that this costs little.
        text = self._tokenizer.decode(token_ids, skip_special_tokens=True).lstrip()
        cut = self._find_stop(text)
        if cut is not None:
            self.text = text[:cut].rstrip()
            return self._emit(len(self.text)), True
        self.text = text
        return self._emit(self._safe_length(text)), False

    def flush(self) -> str:
        """The held-back rest, once the answer has ended for another reason (EOS, length)."""
        self.text = self.text.rstrip()
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        piece = self.text[self._emitted : upto]
        self._emitted = upto
        return piece

    def _find_stop(self, text: str) -> int | None:
        start = max(0, self._emitted - self._longest)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_length(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))  # U+FFFD: a character whose bytes have not all arrived yet
        for size in range(min(self._longest - 1, end), 0, -1):
            tail = text[end - size : end]
            if any(s.startswith(tail) for s in self._stop):
                end -= size
                break
        return len(text[:end].rstrip())
