"""Structured output: a grammar per request (llguidance) that masks the tokens which would break it.

`Grammars` turns a request's `structured` setting into a `RowGrammar` on the caller's thread, so a
schema llguidance cannot compile is an InvalidParameter("response_format") from make_request, never
a failure inside a step. The engine thread then, each step, masks the row's logits to the tokens the
grammar allows (`mask`) and advances the matcher with the chosen token (`advance`); once the grammar
is complete only EOS is allowed, so the answer ends with finish_reason "stop".

The mask for step N+1 needs token N on the host: rows with a grammar do not run ahead (runner.py).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..sampling import StructuredOutput
from .errors import InvalidParameter

# JSON with no free whitespace between tokens: a model cannot pad an answer with endless newlines.
_LAYOUT = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


class RowGrammar:
    """One request's grammar state (a compiled llguidance matcher)."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self._words = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [vocab] of tokens the grammar does not allow next to -inf, in place."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, self._words, 0)
        # Unpack the 32-token words into one bit per token (plain torch: llguidance's helper compiles).
        allowed = ((self._words[0, :, None] >> _BITS) & 1).flatten().bool()
        vocab = logits.shape[-1]
        allowed = (
            allowed[:vocab]
            if allowed.numel() >= vocab
            else torch.nn.functional.pad(allowed, (0, vocab - allowed.numel()))
        )
        logits.masked_fill_(~allowed.to(logits.device, non_blocking=True), float("-inf"))

    def advance(self, token: int) -> bool:
        """Take the chosen token; returns whether the grammar is complete (nothing may follow)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(
                f"the grammar refused token {token}, which its own mask allowed: {self._matcher.get_error()}"
            )
        return self._matcher.is_stopped()


class Grammars:
    """Compiles requests' grammars against the engine's tokenizer (its llguidance form built once, on
    first use: about a second, which engines that never see structured output do not pay)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._tokenizer = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
                except Exception as err:  # e.g. a slow (Python) tokenizer: llguidance needs a fast one
                    raise InvalidParameter(
                        "response_format", f"structured output is not available with this model's tokenizer: {err}"
                    ) from None
            return self._tokenizer

    def compile(self, structured: StructuredOutput) -> RowGrammar:
        """A fresh grammar for one answer; InvalidParameter("response_format") if it does not compile."""
        from llguidance import LLMatcher

        schema: dict[str, Any] = (
            {"type": "object"} if structured.type == "json_object" else dict(structured.json_schema)
        )
        schema.setdefault("x-guidance", _LAYOUT)
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema)
            matcher = LLMatcher(self._llg_tokenizer(), grammar)
        except (ValueError, TypeError, RuntimeError) as err:
            raise InvalidParameter("response_format", f"the JSON schema cannot be used: {err}") from None
        if matcher.is_error():
            raise InvalidParameter("response_format", f"the JSON schema cannot be used: {matcher.get_error()}")
        return RowGrammar(matcher, self._vocab_size)
