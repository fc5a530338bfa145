"""Generated token ids -> text that is safe to stream: whole characters only, nothing that could
still turn out to be the start of a stop string, and no trailing whitespace (answers end trimmed,
and what was streamed must stay a prefix of the final text)."""

from __future__ import annotations

from collections.abc import Sequence


def _decoder(tokenizer):
    """ids -> text without special tokens. A fast tokenizer's Rust backend directly, when it gives
    what tokenizer.decode gives (no clean-up pass): the engine decodes every row every step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._decode = _decoder(tokenizer)
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._emitted = 0
        self._raw = ""  # the decoded answer so far, before the leading-space strip
        self._prefix = 0  # tokens before this one are final in _raw
        self._read = 0  # tokens before this one have been decoded into _raw

    def _decode_new(self, token_ids: list[int]) -> str:
        """Text the new tokens add. Decoding them together with the few tokens before them keeps
        sentencepiece spacing right; a character whose bytes are still coming waits (U+FFFD)."""
        before = self._decode(token_ids[self._prefix : self._read])
        now = self._decode(token_ids[self._prefix :])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(token_ids)
        return now[len(before) :]

    def piece(self, token_id: int) -> str:
        """One token's text, decoded on its own (special tokens included): for logprobs."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Take all tokens so far; return (new text to show, whether a stop string ended the answer)."""
        self._raw += self._decode_new(token_ids)
        text = self._raw.lstrip()
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
