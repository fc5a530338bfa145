"""Which request runs in which cache slot, and what each step runs: the scheduler's plans, which the
runner (runner.py) executes on the decoder. Only the engine thread calls in here.

The slot contract, in one place: running request i (`Scheduler.rows[i]`) lives in cache slot i, so
slots 0..n-1 are always the running ones. A `DecodePlan` runs rows[i] in slot i; a prefill pack of
k requests joins at slots n..n+k-1 (`join` says where); a finished row's slot is refilled by moving
the last row into it (`remove` returns the `SlotMove`s to apply to the cache). A prompt longer than
prefill_tokens is prefilled a chunk per step (`ChunkPlan`) in the last slot, kept free for it, and
joins the running rows (moved to the next free slot) with its last chunk.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from .errors import Cancelled, EngineError, InvalidParameter
from .request import Request

# A small prefill pack waits (Scheduler._hold_back) at most until 1/HOLD_SLOTS of the slots are free,
# and at most HOLD_S seconds.
HOLD_SLOTS = 10
HOLD_S = 0.2


class SlotMove(NamedTuple):
    """Copy the first `length` cached tokens of slot `source` into slot `target`."""

    source: int
    target: int
    length: int


class DecodePlan(NamedTuple):
    """One decode step: rows[i] gets one new token in cache slot i (slots 0..len(rows)-1)."""

    rows: list[Request]
    positions: list[int]  # where each row's new token goes in its slot
    feed_from: list[int]  # the row's token's index in the step in flight; -1: its last collected token
    adapters: list[int]  # each row's adapter index (-1: the base)

    @property
    def slots(self) -> range:
        return range(len(self.rows))


class ChunkPlan(NamedTuple):
    """The next chunk of the long prompt being prefilled: prompt tokens start.. into cache slot `slot`."""

    request: Request
    slot: int
    start: int
    ids: list[int]
    last: bool  # its last chunk: the request takes its first token and joins the running rows


class AdmissionPlan(NamedTuple):
    refused: list[tuple[Request, EngineError]]  # leave now, with this error
    packs: list[list[Request]]  # prefill packs, in order; each joins the rows where `join` says
    chunk: ChunkPlan | None


class Scheduler:
    def __init__(self, adapters: list[str], max_batch_size: int, max_context: int):
        self.adapter_index = {name: i for i, name in enumerate(adapters)}
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # rows[i] is in cache slot i
        self.partial: Request | None = None  # a long prompt being prefilled chunk by chunk, in the last slot
        self.partial_done = 0  # its tokens in the cache so far
        self.holding_since: float | None = None  # when a small pack began to wait (_hold_back)
        self.clock = time.monotonic

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.rows or self.partial)

    def adapter(self, row: Request) -> int:
        return self.adapter_index.get(row.adapter, -1)

    @staticmethod
    def cached(row: Request) -> int:
        """Tokens of `row` in its cache slot before the step that feeds its newest collected token."""
        return row.prompt_tokens + len(row.token_ids) - 1

    def plan_decode(self, in_flight: list[Request] | None) -> DecodePlan | None:
        """A decode step for every running row (None when none runs). A row in the step `in_flight`
        (launched, not collected yet) is fed that step's token, one position further on; a row admitted
        since is fed its first token. A row the in-flight step ends by length is clamped to the cache's
        last position: its step is wasted anyway."""
        if not self.rows:
            return None
        rows = list(self.rows)
        ahead = {id(r): j for j, r in enumerate(in_flight)} if in_flight else {}
        feed_from = [ahead.get(id(r), -1) for r in rows]
        positions = [min(self.cached(r) + (j >= 0), self.max_context - 1) for r, j in zip(rows, feed_from, strict=True)]
        return DecodePlan(rows, positions, feed_from, [self.adapter(r) for r in rows])

    def plan_admission(self, prefill_tokens: int) -> AdmissionPlan:
        """Waiting requests for the free slots, short prompts (<= prefill_tokens) in packs of at most
        prefill_tokens tokens (a small last pack may wait a few steps: _hold_back); and the next
        chunk of a long prompt: one chunk per step, a long prompt at a time (the others wait their turn)."""
        refused: list[tuple[Request, EngineError]] = []
        chosen: list[Request] = []
        passed: list[Request] = []  # long prompts waiting for the chunking slot
        while self.waiting and len(self.rows) + len(chosen) + (self.partial is not None) < self.max_batch_size:
            request = self.waiting.popleft()
            if request.cancelled:
                refused.append((request, Cancelled()))
            elif not request.prompt_ids:  # make_request refuses these; a Request built by hand fails alone
                refused.append((request, InvalidParameter("prompt", "the prompt has 0 tokens")))
            elif request.prompt_tokens <= prefill_tokens:
                chosen.append(request)
            elif self.partial is None:
                self.partial, self.partial_done = request, 0
            else:
                passed.append(request)
        self.waiting.extendleft(reversed(passed))
        packs = list(prefill_chunks(chosen, prefill_tokens))
        if packs and self._hold_back(packs[-1], prefill_tokens):
            self.waiting.extendleft(reversed(packs.pop()))
        else:
            self.holding_since = None
        return AdmissionPlan(refused, packs, self._next_chunk(prefill_tokens))

    def _hold_back(self, pack: list[Request], prefill_tokens: int) -> bool:
        """Whether a small last pack waits for more free slots. A pack costs a whole pack's forward
        (on CUDA it is padded to prefill_tokens, and decoding stops meanwhile), so when the engine is
        slot-bound (more requests wait than slots are free) and rows are decoding, a pack under half
        full waits for rows to finish: until it is half full, a tenth of the slots are free, or it
        has waited HOLD_S. Otherwise, e.g. while requests arrive one by one to free slots, every
        request goes at once."""
        if not self.rows or not self.waiting:  # nothing decoding, or every waiting request fits now
            return False
        free = self.max_batch_size - len(self.rows) - (self.partial is not None)
        if sum(r.prompt_tokens for r in pack) >= prefill_tokens // 2 or free >= self.max_batch_size // HOLD_SLOTS:
            return False
        now = self.clock()
        if self.holding_since is None:
            self.holding_since = now
        return now - self.holding_since < HOLD_S

    def _next_chunk(self, prefill_tokens: int) -> ChunkPlan | None:
        request, start = self.partial, self.partial_done
        if request is None:
            return None
        ids = request.prompt_ids[start : start + prefill_tokens]
        return ChunkPlan(request, self.max_batch_size - 1, start, ids, start + len(ids) == request.prompt_tokens)

    def join(self, requests: list[Request]) -> int:
        """Add prefilled requests to the running rows; returns the slot of the first (the rest follow)."""
        first = len(self.rows)
        self.rows.extend(requests)
        return first

    def chunk_done(self, chunk: ChunkPlan) -> tuple[int, SlotMove | None]:
        """Record a prefilled chunk. With the last one the request joins the running rows: returns
        its row (= slot) and the move from the chunking slot into it (None if it is that slot)."""
        self.partial_done = chunk.start + len(chunk.ids)
        if not chunk.last:
            return -1, None
        self.partial = None
        target = self.join([chunk.request])
        return target, (SlotMove(chunk.slot, target, chunk.request.prompt_tokens) if target != chunk.slot else None)

    def abandon_chunked(self) -> None:
        """The long prompt failed: free the chunking slot."""
        self.partial = None

    def remove(self, indices: list[int]) -> list[SlotMove]:
        """Drop these rows, moving the last running row into each freed slot (with the token a step
        in flight may be writing for it); returns the moves, to apply to the cache in order."""
        moves = []
        for i in sorted(indices, reverse=True):
            last = self.rows.pop()
            if i < len(self.rows):
                moves.append(SlotMove(len(self.rows), i, min(self.cached(last) + 1, self.max_context)))
                self.rows[i] = last
        return moves

    def drop_cancelled(self) -> tuple[list[Request], list[SlotMove]]:
        """Take out the cancelled requests (the long prompt, running rows); returns them and the moves."""
        dropped = []
        if self.partial is not None and self.partial.cancelled:
            dropped.append(self.partial)
            self.partial = None
        gone = [i for i, row in enumerate(self.rows) if row.cancelled]
        dropped += [self.rows[i] for i in gone]
        return dropped, self.remove(gone)

    def clear_rows(self) -> list[Request]:
        """Drop every running row (their step failed); returns them."""
        rows, self.rows = self.rows, []
        return rows

    def take_all(self) -> list[Request]:
        """Every request the scheduler holds (waiting, running, the long prompt), leaving it empty."""
        everyone = [*self.waiting, *self.rows, *([self.partial] if self.partial else [])]
        self.waiting.clear()
        self.rows = []
        self.partial = None
        return everyone


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
