"""What a caller asks for (SamplingParams), what it gets back (Completion, Delta), and the
per-request state the engine keeps while generating (Request)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import InvalidParameter
from .textstream import TextStream

MAX_STOP_STRINGS = 4


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def check(self) -> None:
        """Raise InvalidParameter naming the first out-of-range field."""
        if self.max_tokens < 1:
            raise InvalidParameter("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidParameter("temperature", f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidParameter("stop", f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Delta:
    """A new piece of one answer; the last one carries the finished Completion (or the error)."""

    text: str
    completion: Completion | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None or self.error is not None


class Request:
    """One prompt being answered: inputs, sampling state, generated tokens and text so far.

    Built on the caller's thread (Engine.make_request); after submit only the engine thread
    touches it, except `cancel()`.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None, text: TextStream, device):
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter
        self.text = text
        self.token_ids: list[int] = []
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

    def completion(self, finish_reason: str) -> Completion:
        return Completion(
            text=self.text.text,
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            token_ids=list(self.token_ids),
        )
