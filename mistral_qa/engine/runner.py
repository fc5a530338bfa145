"""Continuous batching, executed: one step = one decode step for every running sequence, then admit
waiting requests (prefill, first token). What runs where is the scheduler's plan (scheduler.py:
running request i is in cache slot i); the runner carries the plans out on the decoder, samples,
checks for the end of each answer, streams text and counts where the time goes. Finished rows leave
at once and their slots go to waiting requests at the next step, so a long answer never holds up
short ones. A long prompt is prefilled a chunk per step, with decode steps for the running rows
between its chunks, so one long prompt never stalls the others' streams. Every row carries its own
adapter index, so one decode step serves the base and any mix of adapters. Only the engine thread
calls in here.

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

import torch

from .decoder import SlotDecoder
from .errors import Cancelled
from .graphs import PREFILL_TOKENS, DecodeSteps, host_longs
from .request import Delta, Request, TokenLogprob
from .sampling import Choice, HostLogprobs, choose, next_tokens
from .scheduler import ChunkPlan, Scheduler, SlotMove
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
        self.stats = EngineStats()
        self.steps = DecodeSteps(decoder, compile=compile and cuda, prefill_tokens=prefill_tokens, stats=self.stats)
        self.scheduler = Scheduler(adapters, max_batch_size, max_context)
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.eos_ids = eos_ids
        self.in_flight: tuple[list[Request], Choice] | None = None  # a launched step: its rows, tokens

    @property
    def running(self) -> int:
        return len(self.scheduler.rows)

    def has_work(self) -> bool:
        return bool(self.scheduler.has_work() or self.in_flight)

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    @torch.inference_mode()
    def step(self) -> None:
        """Launch the next decode step, then collect the one before it and stream its tokens' text
        while the GPU computes (with a grammar row running: collect first, then launch); then admit
        waiting requests. Timed into self.stats (the GPU wait in _collect, prefill in _admit)."""
        started = time.perf_counter()
        self._drop_cancelled()
        previous, self.in_flight = self.in_flight, None
        if previous is not None and any(r.grammar is not None for r in self.scheduler.rows):
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

    def _move(self, moves: list[SlotMove]) -> None:
        for move in moves:
            self.decoder.cache.move(*move)

    def _remove(self, indices: list[int]) -> None:
        self._move(self.scheduler.remove(indices))

    def _launch(self, previous: tuple[list[Request], Choice] | None) -> None:
        """Launch the scheduler's decode step (see Scheduler.plan_decode); a row in the `previous`
        step is fed that step's token straight from the GPU."""
        plan = self.scheduler.plan_decode(previous[0] if previous else None)
        if plan is None:
            return
        try:
            device = self.decoder.device
            ids = host_longs([r.token_ids[-1] for r in plan.rows], device).to(device, non_blocking=True)
            if previous and any(j >= 0 for j in plan.feed_from):
                index = host_longs(plan.feed_from, device).to(device, non_blocking=True)
                ids = torch.where(index >= 0, previous[1].tokens[index.clamp(min=0)], ids)
            logits = self.steps(ids, plan.positions, plan.adapters)  # slots 0..len(rows)-1: plan.slots
            tokens = choose(logits, plan.rows)
        except Exception as err:  # a failed step fails its rows, never the engine
            self._fail(plan.rows, err)
            self.scheduler.clear_rows()
            return
        self.in_flight = (plan.rows, tokens)
        longest = max(plan.positions) + 1
        self.stats.decode_step(len(plan.rows), self.steps.shape(len(plan.rows), longest)[2], longest)

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
            self._fail(list(self.scheduler.rows), err)
            self.scheduler.clear_rows()
            self.in_flight = None
            return []
        self.stats.gpu_wait_s += time.perf_counter() - waiting
        running = {id(r) for r in self.scheduler.rows}
        collected = [
            (row, self._append(row, *token)) for row, token in zip(rows, tokens, strict=True) if id(row) in running
        ]
        ended = {id(row) for row, finish in collected if finish is not None}
        self._remove([i for i, row in enumerate(self.scheduler.rows) if id(row) in ended])
        return collected

    def _stream(self, collected: list[tuple[Request, str | None]]) -> None:
        ended = {id(row) for row, finish in collected if self._emit(row, finish)}
        self._remove([i for i, row in enumerate(self.scheduler.rows) if id(row) in ended])

    def _admit(self) -> None:
        """Carry out the scheduler's admission plan: refusals, prefill packs, a long prompt's next chunk."""
        plan = self.scheduler.plan_admission(self.steps.prefill_tokens)
        for request, error in plan.refused:
            request.on_delta(Delta("", error=error))
        for pack in plan.packs:
            started = time.perf_counter()
            self._prefill(pack)
            self.stats.prefill(len(pack), sum(r.prompt_tokens for r in pack), time.perf_counter() - started)
        if plan.chunk is not None:
            self._prefill_chunk(plan.chunk)

    def _prefill_chunk(self, chunk: ChunkPlan) -> None:
        """Prefill the long prompt's next chunk into its slot; with its last chunk it takes its first
        token and joins the running rows."""
        request = chunk.request
        started = time.perf_counter()
        try:
            padding = self.steps.prefill_padding(len(chunk.ids))
            adapter = self.scheduler.adapter(request)
            logits = self.decoder.prefill_chunk(chunk.ids, chunk.slot, chunk.start, adapter, *padding)
            token = next_tokens(logits, [request])[0] if chunk.last else None
        except Exception as err:
            self.scheduler.abandon_chunked()
            self._fail([request], err)
            return
        finally:
            self.stats.prefill(int(chunk.last), len(chunk.ids), time.perf_counter() - started)
        target, move = self.scheduler.chunk_done(chunk)
        if not chunk.last:
            return
        self._move([move] if move else [])
        if self._emit(request, self._append(request, *token)):
            self._remove([target])

    def _prefill(self, requests: list[Request]) -> None:
        first = len(self.scheduler.rows)  # the slot the pack's first prompt goes into (see Scheduler.join)
        total = sum(r.prompt_tokens for r in requests)
        try:
            logits = self.decoder.prefill(
                [r.prompt_ids for r in requests],
                first,
                [self.scheduler.adapter(r) for r in requests],
                *self.steps.prefill_padding(total),
            )
            tokens = next_tokens(logits, requests)
        except Exception as err:
            self._fail(requests, err)
            return
        first = self.scheduler.join(requests)
        ended = [
            first + i
            for i, (r, t) in enumerate(zip(requests, tokens, strict=True))
            if self._emit(r, self._append(r, *t))
        ]
        self._remove(ended)

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
        dropped, moves = self.scheduler.drop_cancelled()
        for request in dropped:
            request.on_delta(Delta("", error=Cancelled()))
        self._move(moves)

    def _fail(self, rows: list[Request], err: Exception) -> None:
        if not rows:
            return
        log.error("generation failed for %d request(s)", len(rows), exc_info=err)
        for row in rows:
            row.on_delta(Delta("", error=err))

    def fail_all(self, err: Exception) -> None:
        self._fail(self.scheduler.take_all(), err)
        self.in_flight = None
