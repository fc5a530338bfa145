"""What a caller asks for (SamplingParams, from mistral_qa.sampling), what it gets back (Completion, Delta), and the
per-request state the engine keeps while generating (Request)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..sampling import SamplingParams
from .textstream import TextStream

if TYPE_CHECKING:
    from .grammar import RowGrammar


@dataclass
class TokenLogprob:
    """One generated token with its log-probability (under the distribution it was drawn from, after
    penalties and grammar masks, before temperature/top_p/top_k), and the `top_logprobs` likeliest
    alternatives at that position as (token id, text, logprob), likeliest first."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when params.logprobs


@dataclass
class Delta:
    """A new piece of one answer; the last one carries the finished Completion (or the error)."""

    text: str
    completion: Completion | None = None
    error: BaseException | None = None
    logprobs: list[TokenLogprob] | None = None  # tokens generated since the previous Delta (params.logprobs)

    @property
    def finished(self) -> bool:
        return self.completion is not None or self.error is not None


class Request:
    """One prompt being answered: inputs, sampling state, generated tokens and text so far.

    Built on the caller's thread (Engine.make_request); after submit only the engine thread
    touches it, except `cancel()`.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None,
        text: TextStream,
        device,
        grammar: RowGrammar | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter
        self.text = text
        self.token_ids: list[int] = []
        self.grammar = grammar  # structured output: masks each step's logits (engine.grammar)
        self.counts: torch.Tensor | None = None  # times each token was generated (penalties), on the device
        self.logprobs: list[TokenLogprob] = []  # one per token when params.logprobs
        self._logprobs_sent = 0
        self.on_delta: Callable[[Delta], None] = lambda delta: None
        self.created = time.monotonic()
        self.first_token_at: float | None = None  # set by the engine thread
        self._cancelled = threading.Event()
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            # A per-request generator: a seeded request samples the same answer whatever it is batched with.
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating for this request at the next step (the client went away)."""
        self._cancelled.set()

    def new_logprobs(self) -> list[TokenLogprob] | None:
        """The logprobs of tokens generated since the last call (for the next Delta); None if not asked."""
        if not self.params.logprobs:
            return None
        new = self.logprobs[self._logprobs_sent :]
        self._logprobs_sent = len(self.logprobs)
        return new

    def completion(self, finish_reason: str) -> Completion:
        return Completion(
            text=self.text.text,
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs) if self.params.logprobs else None,
        )
