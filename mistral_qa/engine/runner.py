"""Continuous batching: one step = one decode step for every running sequence, then admit waiting
requests (prefill, first token). Finished rows leave at once and their slots go to waiting
requests at the next step, so a long answer never holds up short ones.

A prompt longer than prefill_tokens is prefilled in chunks of that size, one chunk per step, in the
last cache slot (kept free for it); running rows get a decode step between its chunks, so one long
prompt never stalls the others' streams. It joins the running rows with its last chunk.

Running request i lives in cache slot i (slots 0..n-1 are always the running ones: a finished
row's slot is refilled by moving the last row into it). Every row carries its own adapter index,
so one decode step serves the base and any mix of adapters. Only the engine thread calls in here.

Decode runs one step ahead of the host: step N+1 is launched with step N's tokens while they are
still on the GPU, and only then are step N's tokens read, appended and streamed, so the GPU never
waits for the host between steps. A row that step N ends (EOS, a stop string, its length) has
already been given to step N+1: that costs one wasted row-step, whose token is dropped. Rows with
a grammar need step N's token on the host to build step N+1's mask: while one runs, each step is
collected before the next is launched.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

import torch

from .decoder import SlotDecoder
from .errors import Cancelled, InvalidParameter
from .graphs import PREFILL_TOKENS, DecodeSteps, host_longs
from .request import Delta, Request, TokenLogprob
from .sampling import Choice, HostLogprobs, choose, next_tokens
from .stats import EngineStats

log = logging.getLogger(__name__)


class StepRunner:
    def __init__(
        self,
        decoder: SlotDecoder,
        adapters: list[str],
        max_batch_size: int,
        max_context: int,
        eos_ids: set[int],
        compile: bool = False,
        prefill_tokens: int = PREFILL_TOKENS,
    ):
        self.decoder = decoder
        cuda = decoder.device.type == "cuda"
        self.steps = DecodeSteps(decoder, compile=compile and cuda, prefill_tokens=prefill_tokens)
        self.adapter_index = {name: i for i, name in enumerate(adapters)}
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.eos_ids = eos_ids
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # rows[i] is in cache slot i
        self.partial: Request | None = None  # a long prompt being prefilled chunk by chunk, in the last slot
        self.partial_done = 0  # its tokens in the cache so far
        self.in_flight: tuple[list[Request], Choice] | None = None  # a launched step: its rows, tokens
        self.stats = EngineStats()

    @property
    def running(self) -> int:
        return len(self.rows)

    def has_work(self) -> bool:
        return bool(self.waiting or self.rows or self.in_flight or self.partial)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @torch.inference_mode()
    def step(self) -> None:
        """Launch the next decode step, then collect the one before it and stream its tokens' text
        while the GPU computes (with a grammar row running: collect first, then launch); then admit
        waiting requests. Timed into self.stats (the GPU wait in _collect, prefill in _admit)."""
        started = time.perf_counter()
        self._drop_cancelled()
        previous, self.in_flight = self.in_flight, None
        if previous is not None and any(r.grammar is not None for r in self.rows):
            self._finish(previous)  # grammar masks need the previous token on the host: no running ahead
            previous = None
        launching = time.perf_counter()
        self._launch(previous)
        self.stats.launch_s += time.perf_counter() - launching
        self._finish(previous)
        self._admit()
        self.stats.busy_s += time.perf_counter() - started

    def _finish(self, launched: tuple[list[Request], Choice] | None) -> None:
        """Collect a launched step and stream its text."""
        collected = self._collect(launched)
        streaming = time.perf_counter()
        self._stream(collected)
        self.stats.text_s += time.perf_counter() - streaming

    @staticmethod
    def _cached(row: Request) -> int:
        """Tokens of `row` in its cache slot before the step that feeds its newest collected token."""
        return row.prompt_tokens + len(row.token_ids) - 1

    def _adapter(self, row: Request) -> int:
        return self.adapter_index.get(row.adapter, -1)

    def _launch(self, previous: tuple[list[Request], Choice] | None) -> None:
        """Launch a decode step for every running row. A row in the `previous` step (not collected
        yet) is fed that step's token straight from the GPU, one position further on; a row admitted
        since is fed its first token. A row the previous step ends by length is clamped to the cache's
        last position: its step is wasted anyway."""
        if not self.rows:
            return
        rows = list(self.rows)
        ahead = {id(r): j for j, r in enumerate(previous[0])} if previous else {}
        source = [ahead.get(id(r), -1) for r in rows]
        positions = [min(self._cached(r) + (j >= 0), self.max_context - 1) for r, j in zip(rows, source, strict=True)]
        try:
            device = self.decoder.device
            ids = host_longs([r.token_ids[-1] for r in rows], device).to(device, non_blocking=True)
            if previous and any(j >= 0 for j in source):
                index = host_longs(source, device).to(device, non_blocking=True)
                ids = torch.where(index >= 0, previous[1].tokens[index.clamp(min=0)], ids)
            logits = self.steps(ids, positions, [self._adapter(r) for r in rows])
            tokens = choose(logits, rows)
        except Exception as err:  # a failed step fails its rows, never the engine
            self._fail(rows, err)
            self.rows = []
            return
        self.in_flight = (rows, tokens)
        longest = max(positions) + 1
        self.stats.decode_step(len(rows), self.steps.shape(len(rows), longest)[2], longest)

    def _collect(self, launched: tuple[list[Request], Choice] | None) -> list[tuple[Request, str | None]]:
        """Read the tokens of a launched step; give each still-running row its token. Rows that EOS or
        a length limit ends leave now. Returns (row, finish reason or None)."""
        if launched is None:
            return []
        rows, tokens = launched
        waiting = time.perf_counter()
        try:
            tokens = tokens.read()
        except Exception as err:
            self._fail(self.rows, err)
            self.rows = []
            self.in_flight = None
            return []
        self.stats.gpu_wait_s += time.perf_counter() - waiting
        running = {id(r) for r in self.rows}
        collected = [
            (row, self._append(row, *token)) for row, token in zip(rows, tokens, strict=True) if id(row) in running
        ]
        ended = {id(row) for row, finish in collected if finish is not None}
        self._remove([i for i, row in enumerate(self.rows) if id(row) in ended])
        return collected

    def _stream(self, collected: list[tuple[Request, str | None]]) -> None:
        ended = {id(row) for row, finish in collected if self._emit(row, finish)}
        self._remove([i for i, row in enumerate(self.rows) if id(row) in ended])

    def _admit(self) -> None:
        """Prefill waiting requests into free slots (short prompts in packs), and the next chunk of a
        long prompt: one chunk per step, a long prompt at a time (the others wait their turn)."""
        chosen: list[Request] = []
        passed: list[Request] = []  # long prompts waiting for the chunking slot
        while self.waiting and self.running + len(chosen) + (self.partial is not None) < self.max_batch_size:
            request = self.waiting.popleft()
            if request.cancelled:
                request.on_delta(Delta("", error=Cancelled()))
            elif not request.prompt_ids:  # make_request refuses these; a Request built by hand fails alone
                request.on_delta(Delta("", error=InvalidParameter("prompt", "the prompt has 0 tokens")))
            elif request.prompt_tokens <= self.steps.prefill_tokens:
                chosen.append(request)
            elif self.partial is None:
                self.partial, self.partial_done = request, 0
            else:
                passed.append(request)
        self.waiting.extendleft(reversed(passed))
        for chunk in prefill_chunks(chosen, self.steps.prefill_tokens):
            started = time.perf_counter()
            self._prefill(chunk)
            self.stats.prefill(len(chunk), sum(r.prompt_tokens for r in chunk), time.perf_counter() - started)
        if self.partial is not None:
            self._prefill_next_chunk()

    def _prefill_next_chunk(self) -> None:
        """Prefill the long prompt's next chunk into the last slot; with its last chunk it takes its
        first token and joins the running rows (moved to the next free slot)."""
        request, start, slot = self.partial, self.partial_done, self.max_batch_size - 1
        chunk = request.prompt_ids[start : start + self.steps.prefill_tokens]
        last = start + len(chunk) == request.prompt_tokens
        started = time.perf_counter()
        try:
            padding = self.steps.prefill_padding(len(chunk))
            logits = self.decoder.prefill_chunk(chunk, slot, start, self._adapter(request), *padding)
            token = next_tokens(logits, [request])[0] if last else None
        except Exception as err:
            self.partial = None
            self._fail([request], err)
            return
        finally:
            self.stats.prefill(int(last), len(chunk), time.perf_counter() - started)
        self.partial_done = start + len(chunk)
        if not last:
            return
        self.partial = None
        target = len(self.rows)
        if target != slot:
            self.decoder.cache.move(slot, target, request.prompt_tokens)
        self.rows.append(request)
        if self._emit(request, self._append(request, *token)):
            self._remove([target])

    def _prefill(self, requests: list[Request]) -> None:
        first = len(self.rows)
        total = sum(r.prompt_tokens for r in requests)
        try:
            logits = self.decoder.prefill(
                [r.prompt_ids for r in requests],
                first,
                [self._adapter(r) for r in requests],
                *self.steps.prefill_padding(total),
            )
            tokens = next_tokens(logits, requests)
        except Exception as err:
            self._fail(requests, err)
            return
        self.rows.extend(requests)
        ended = [
            first + i
            for i, (r, t) in enumerate(zip(requests, tokens, strict=True))
            if self._emit(r, self._append(r, *t))
        ]
        self._remove(ended)

    def _remove(self, indices: list[int]) -> None:
        """Drop these rows, moving the last running row into each freed slot (with the token a step
        in flight may be writing for it)."""
        for i in sorted(indices, reverse=True):
            last = self.rows.pop()
            if i < len(self.rows):
                self.decoder.cache.move(len(self.rows), i, min(self._cached(last) + 1, self.max_context))
                self.rows[i] = last

    def _append(self, row: Request, token: int, logprobs: HostLogprobs | None = None) -> str | None:
        """Record one token (and its logprobs); the finish reason it brings (EOS, a completed grammar,
        max_tokens, the context), if any."""
        row.token_ids.append(token)
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
        if logprobs is not None:
            logprob, top = logprobs
            piece = row.text.piece
            row.logprobs.append(TokenLogprob(token, piece(token), logprob, [(i, piece(i), lp) for i, lp in top]))
        if token in self.eos_ids:
            return "stop"
        if row.grammar is not None and row.grammar.advance(token):
            return "stop"
        if len(row.token_ids) >= row.params.max_tokens or row.prompt_tokens + len(row.token_ids) >= self.max_context:
            return "length"
        return None

    def _emit(self, row: Request, finish: str | None) -> bool:
        """Stream the row's new text; returns whether it has finished (`finish`, or a stop string)."""
        piece, stopped = row.text.push(row.token_ids)
        if stopped:
            finish = "stop"
        if finish is None:
            if piece:
                row.on_delta(Delta(piece, logprobs=row.new_logprobs()))
            return False
        text = piece + row.text.flush()
        row.on_delta(Delta(text, completion=row.completion(finish), logprobs=row.new_logprobs()))
        return True

    def _drop_cancelled(self) -> None:
        if self.partial is not None and self.partial.cancelled:
            self.partial.on_delta(Delta("", error=Cancelled()))
            self.partial = None
        gone = [i for i, row in enumerate(self.rows) if row.cancelled]
        for i in gone:
            self.rows[i].on_delta(Delta("", error=Cancelled()))
        self._remove(gone)

    def _fail(self, rows: list[Request], err: Exception) -> None:
        if not rows:
            return
        log.error("generation failed for %d request(s)", len(rows), exc_info=err)
        for row in rows:
            row.on_delta(Delta("", error=err))

    def fail_all(self, err: Exception) -> None:
        self._fail([*self.waiting, *self.rows, *([self.partial] if self.partial else [])], err)
        self.waiting.clear()
        self.rows = []
        self.partial = None
        self.in_flight = None


def prefill_chunks(requests: list[Request], chunk_tokens: int) -> Iterable[list[Request]]:
    """Consecutive runs of requests whose prompts together stay within chunk_tokens (each prompt
    is at most chunk_tokens long: longer ones are prefilled in chunks)."""
    chunk: list[Request] = []
    total = 0
    for request in requests:
        if chunk and total + request.prompt_tokens > chunk_tokens:
            yield chunk
            chunk, total = [], 0
        chunk.append(request)
        total += request.prompt_tokens
    if chunk:
        yield chunk
