"""Which rows each worker trains on at each step: a pure function of (seed, step, rank).

Because the order depends only on these numbers, a run restarted from the checkpoint of step k
sees exactly the batches an uninterrupted run would have seen after step k.

Three layouts: `batch_size` rows per micro-batch in shuffled order (micro_batch_indices, the
reference schedule); `batch_size` rows per micro-batch, length-grouped (GroupedRowsSchedule: the
reference's rows per step with little padding); or length-grouped batches within a token budget
(TokenBudgetSchedule, training.batch_tokens). The grouped ones spend little compute on padding
while every row is still seen once per epoch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_rows))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def micro_batch_indices(
    n_rows: int, seed: int, step: int, micro: int, grad_accum: int, batch_size: int, world: int, rank: int
) -> list[int]:
    """Row indices for micro-batch `micro` of optimiser step `step` (1-based) on worker `rank`.

    The global stream of rows is a fresh shuffle per epoch; each global micro-batch of
    batch_size * world rows is cut into contiguous per-rank shards.
    """
    global_micro = (step - 1) * grad_accum + micro
    start = (global_micro * world + rank) * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_rows)
        indices.append(_epoch_order(n_rows, seed, epoch)[offset])
    return indices


# Rows sorted by length together: about this many batches' worth (HF's LengthGroupedSampler uses 50).
# More: less padding; fewer: the rows of a batch are a more random sample.
MEGABATCH_BATCHES = 50


def budget_batches(lengths: Sequence[int], rows: Sequence[int], budget: int) -> list[list[int]]:
    """Cut `rows` (in order) greedily into batches whose padded size, rows x longest, is within budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row in rows:
        wider = max(longest, lengths[row])
        if current and wider * (len(current) + 1) > budget:
            batches.append(current)
            current, wider = [], lengths[row]
        current.append(row)
        longest = wider
    if current:
        batches.append(current)
    return batches


class LengthGroupedSchedule:
    """Length-grouped micro-batches: a pure function of (seed, step, rank) like micro_batch_indices.

    Per epoch: the rows are shuffled (the same shuffle as micro_batch_indices), cut into megabatches
    of about MEGABATCH_BATCHES batches' worth of rows, each sorted by length and cut into batches
    (`_cut`: by token budget or by row count); then the epoch's batches are shuffled.
    Global micro-batch g on worker `rank` is batch g * world + rank of the concatenated epochs.
    """

    def __init__(self, lengths: Sequence[int], seed: int, megabatch_rows: int):
        self.lengths, self.seed = list(lengths), seed
        self.megabatch_rows = max(1, megabatch_rows)
        self._epochs: list[list[list[int]]] = []  # computed once each: a pure function of the arguments

    def _cut(self, mega: list[int]) -> list[list[int]]:
        raise NotImplementedError  # each schedule says how a sorted megabatch becomes batches

    def epoch(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            self._epochs.append(self._make_epoch(len(self._epochs)))
        return self._epochs[epoch]

    def _make_epoch(self, epoch: int) -> list[list[int]]:
        order = _epoch_order(len(self.lengths), self.seed, epoch)
        batches = []
        for start in range(0, len(order), self.megabatch_rows):
            mega = sorted(order[start : start + self.megabatch_rows], key=self.lengths.__getitem__)
            batches += self._cut(mega)
        random.Random(f"{self.seed}:{epoch}:batches").shuffle(batches)
        return batches

    def batch(self, index: int) -> list[int]:
        """Batch `index` (0-based) of the stream of all epochs."""
        epoch = 0
        while index >= len(self.epoch(epoch)):
            index -= len(self.epoch(epoch))
            epoch += 1
        return self.epoch(epoch)[index]

    def micro_batch_indices(self, step: int, micro: int, grad_accum: int, world: int, rank: int) -> list[int]:
        """Row indices for micro-batch `micro` of optimiser step `step` (1-based) on worker `rank`."""
        return self.batch(((step - 1) * grad_accum + micro) * world + rank)


class TokenBudgetSchedule(LengthGroupedSchedule):
    """Length-grouped micro-batches of at most `budget` padded tokens (training.batch_tokens)."""

    def __init__(self, lengths: Sequence[int], seed: int, budget: int, megabatch_batches: int = MEGABATCH_BATCHES):
        if max(lengths) > budget:
            raise ValueError(f"a row of {max(lengths)} tokens does not fit a batch budget of {budget} tokens")
        self.budget = budget
        mean_length = sum(lengths) / len(lengths)
        super().__init__(lengths, seed, round(megabatch_batches * budget / mean_length))

    def _cut(self, mega: list[int]) -> list[list[int]]:
        return budget_batches(self.lengths, mega, self.budget)


class GroupedRowsSchedule(LengthGroupedSchedule):
    """`batch_size` rows per micro-batch, length-grouped: the reference schedule's rows per step with
    little padding (what transformers' group_by_length sampler does, as a pure function of the step).

    Each megabatch holds a whole number of batches, so only an epoch's last batch can be short (as
    with HF's sampler, which keeps the last partial batch too).
    """

    def __init__(self, lengths: Sequence[int], seed: int, batch_size: int, megabatch_batches: int = MEGABATCH_BATCHES):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        super().__init__(lengths, seed, megabatch_batches * batch_size)

    def _cut(self, mega: list[int]) -> list[list[int]]:
        return [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed for dropout at a step: restarting from a checkpoint replays the same randomness."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**31)
