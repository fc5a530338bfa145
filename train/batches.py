"""Which rows each worker trains on at each step: a pure function of (seed, step, rank).

Because the order depends only on these numbers, a run restarted from the checkpoint of step k
sees exactly the batches an uninterrupted run would have seen after step k.
"""

from __future__ import annotations

import random
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


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed for dropout at a step: restarting from a checkpoint replays the same randomness."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**31)
