"""Continuous batching: one step = admit waiting requests (prefill, first token), then one decode
step for every running batch. Finished rows leave at once and their slots go to waiting requests
at the next step, so a long answer never holds up short ones.

Rows run in one batch per adapter (the adapter is switched per batch), so mixing adapters costs
one forward per adapter per step. Only the engine thread calls into a StepRunner.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import Cancelled
from .kvbatch import KVBatch, decode_step, merge, prefill, select
from .loading import LoadedModel
from .request import Delta, Request
from .sampling import next_tokens

log = logging.getLogger(__name__)

# Padded prompt tokens per prefill forward: bounds prefill memory when many long prompts arrive at once.
PREFILL_TOKEN_BUDGET = 16384


@dataclass
class Group:
    """The running rows of one adapter and their tensors (row i of `kv` is rows[i])."""

    kv: KVBatch
    rows: list[Request]


class StepRunner:
    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_context: int, eos_ids: set[int], pad_id: int):
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.waiting: deque[Request] = deque()
        self.groups: dict[str | None, Group] = {}

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    def has_work(self) -> bool:
        return bool(self.waiting or self.groups)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        for adapter in list(self.groups):
            group = self.groups.pop(adapter)
            try:
                with self.loaded.use(adapter):
                    logits = decode_step(self.loaded.model, group.kv)
                rest = self._accept(group, next_tokens(logits, group.rows))
            except Exception as err:  # a failed step fails its rows, never the engine
                self._fail(group.rows, err)
                continue
            if rest is not None:
                self.groups[adapter] = rest

    def _admit(self) -> None:
        chosen: list[Request] = []
        while self.waiting and self.running + len(chosen) < self.max_batch_size:
            request = self.waiting.popleft()
            if request.cancelled:
                request.on_delta(Delta("", error=Cancelled()))
            else:
                chosen.append(request)
        by_adapter: dict[str | None, list[Request]] = {}
        for request in chosen:
            by_adapter.setdefault(request.adapter, []).append(request)
        for adapter, requests in by_adapter.items():
            for chunk in prefill_chunks(requests):
                self._prefill(adapter, chunk)

    def _prefill(self, adapter: str | None, requests: list[Request]) -> None:
        try:
            with self.loaded.use(adapter):
                kv, logits = prefill(
                    self.loaded.model, [r.prompt_ids for r in requests], self.pad_id, self.loaded.device
                )
            fresh = self._accept(Group(kv, requests), next_tokens(logits, requests))
        except Exception as err:
            self._fail(requests, err)
            return
        if fresh is None:
            return
        running = self.groups.get(adapter)
        self.groups[adapter] = (
            fresh if running is None else Group(merge(running.kv, fresh.kv), running.rows + fresh.rows)
        )

    def _accept(self, group: Group, tokens: list[int]) -> Group | None:
        """Append each row's new token, stream its text, and keep only the unfinished rows."""
        keep = [
            i for i, (row, token) in enumerate(zip(group.rows, tokens, strict=True)) if not self._advance(row, token)
        ]
        if not keep:
            return None
        group.kv.next_ids = torch.tensor(tokens, dtype=torch.long, device=group.kv.mask.device)
        if len(keep) == len(group.rows):
            return group
        return Group(select(group.kv, keep), [group.rows[i] for i in keep])

    def _advance(self, row: Request, token: int) -> bool:
        """Record one token; returns whether the row has finished."""
        row.token_ids.append(token)
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
        piece, stopped = row.text.push(row.token_ids)
        finish = None
        if stopped or token in self.eos_ids:
            finish = "stop"
        elif len(row.token_ids) >= row.params.max_tokens or row.prompt_tokens + len(row.token_ids) >= self.max_context:
            finish = "length"
        if finish is None:
            if piece:
                row.on_delta(Delta(piece))
            return False
        row.on_delta(Delta(piece + row.text.flush(), completion=row.completion(finish)))
        return True

    def _drop_cancelled(self) -> None:
        for adapter, group in list(self.groups.items()):
            keep = [i for i, row in enumerate(group.rows) if not row.cancelled]
            if len(keep) == len(group.rows):
                continue
            for row in group.rows:
                if row.cancelled:
                    row.on_delta(Delta("", error=Cancelled()))
            if keep:
                self.groups[adapter] = Group(select(group.kv, keep), [group.rows[i] for i in keep])
            else:
                del self.groups[adapter]

    def _fail(self, rows: list[Request], err: Exception) -> None:
        if not rows:
            return
        log.error("generation failed for %d request(s)", len(rows), exc_info=err)
        for row in rows:
            row.on_delta(Delta("", error=err))

    def fail_all(self, err: Exception) -> None:
        self._fail([*self.waiting, *(r for g in self.groups.values() for r in g.rows)], err)
        self.waiting.clear()
        self.groups.clear()


def prefill_chunks(requests: list[Request]) -> Iterable[list[Request]]:
    """Consecutive runs of requests whose padded size stays within PREFILL_TOKEN_BUDGET."""
    chunk: list[Request] = []
    for request in requests:
        width = max([request.prompt_tokens, *(r.prompt_tokens for r in chunk)])
        if chunk and width * (len(chunk) + 1) > PREFILL_TOKEN_BUDGET:
            yield chunk
            chunk = []
        chunk.append(request)
    if chunk:
        yield chunk
