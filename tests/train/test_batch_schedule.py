"""The data schedule (train/batches.py): token-budget batches are a pure function of (seed, step, rank),
cover every row once per epoch, stay within the budget and waste little on padding (no Ray, no model)."""

from __future__ import annotations

import random

import pytest

from train.batches import GroupedRowsSchedule, TokenBudgetSchedule, budget_batches, micro_batch_indices

# Lengths shaped like the Alpaca demo rows: mostly short, a long tail up to 512.
LENGTHS = [min(512, int(random.Random(i).lognormvariate(5.2, 0.5))) + 8 for i in range(1000)]


def padded(batch: list[int]) -> int:
    return len(batch) * max(LENGTHS[i] for i in batch)


def test_every_row_once_per_epoch_within_the_budget():
    schedule = TokenBudgetSchedule(LENGTHS, seed=3, budget=4096)
    for epoch in range(3):
        batches = schedule.epoch(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        assert all(padded(b) <= 4096 for b in batches)
    assert schedule.epoch(0) != schedule.epoch(1)  # a new order every epoch


def test_length_grouping_keeps_padding_low():
    batches = TokenBudgetSchedule(LENGTHS, seed=3, budget=4096).epoch(0)
    real = sum(LENGTHS)
    assert 1 - real / sum(padded(b) for b in batches) < 0.05
    assert real / (4096 * len(batches)) > 0.85  # batches are nearly full


def test_schedule_is_a_pure_function_of_seed_step_and_rank():
    first = TokenBudgetSchedule(LENGTHS, seed=3, budget=4096)
    steps = [[first.micro_batch_indices(step, m, 2, 2, r) for m in range(2) for r in range(2)] for step in range(1, 80)]
    resumed = TokenBudgetSchedule(LENGTHS, seed=3, budget=4096)  # a restarted worker asks for a late step first
    assert [resumed.micro_batch_indices(79, m, 2, 2, r) for m in range(2) for r in range(2)] == steps[-1]
    assert TokenBudgetSchedule(LENGTHS, seed=4, budget=4096).micro_batch_indices(1, 0, 2, 2, 0) != steps[0][0]


def test_ranks_take_disjoint_batches_that_together_are_the_global_stream():
    schedule = TokenBudgetSchedule(LENGTHS, seed=0, budget=2048)
    world, grad_accum = 3, 2
    seen = []
    for step in range(1, 11):
        for micro in range(grad_accum):
            ranks = [set(schedule.micro_batch_indices(step, micro, grad_accum, world, r)) for r in range(world)]
            assert not (ranks[0] & ranks[1] or ranks[0] & ranks[2] or ranks[1] & ranks[2])
            seen += [schedule.micro_batch_indices(step, micro, grad_accum, world, r) for r in range(world)]
    assert seen == [schedule.batch(i) for i in range(len(seen))]


def test_batches_run_on_across_epoch_boundaries():
    schedule = TokenBudgetSchedule(LENGTHS, seed=0, budget=8192)
    n0, n1 = len(schedule.epoch(0)), len(schedule.epoch(1))
    assert schedule.batch(n0 - 1) == schedule.epoch(0)[-1]
    assert schedule.batch(n0) == schedule.epoch(1)[0]
    assert schedule.batch(n0 + n1) == schedule.epoch(2)[0]


def test_greedy_cut_and_rows_longer_than_the_budget():
    lengths = [10, 10, 30, 30, 40]
    assert budget_batches(lengths, [0, 1, 2, 3, 4], 60) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="does not fit"):
        TokenBudgetSchedule(lengths, seed=0, budget=39)


def test_grouped_rows_keep_the_reference_rows_per_step_with_little_padding():
    """The reference schedule's fast mode: batch_size rows a step (only an epoch's last batch may be
    short), every row once per epoch, and far less padding than the shuffled reference batches."""
    schedule = GroupedRowsSchedule(LENGTHS, seed=3, batch_size=8)
    for epoch in range(2):
        batches = schedule.epoch(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        assert [len(b) for b in batches].count(8) >= len(batches) - 1  # 1000 rows: 125 full batches
    shuffled = [micro_batch_indices(len(LENGTHS), 3, step, 0, 1, 8, 1, 0) for step in range(1, 126)]
    real = sum(LENGTHS)
    assert 1 - real / sum(padded(b) for b in schedule.epoch(0)) < 0.05
    assert 1 - real / sum(padded(b) for b in shuffled) > 0.25
    resumed = GroupedRowsSchedule(LENGTHS, seed=3, batch_size=8)
    assert resumed.micro_batch_indices(40, 1, 2, 2, 1) == schedule.micro_batch_indices(40, 1, 2, 2, 1)
    with pytest.raises(ValueError, match="batch_size"):
        GroupedRowsSchedule(LENGTHS, seed=3, batch_size=0)


def test_the_loop_picks_the_layout_the_config_names():
    from mistral_qa.configio import load_config
    from train.config import TrainJobConfig
    from train.loop import batch_schedule

    def layout(*overrides):
        return batch_schedule(load_config(TrainJobConfig, None, list(overrides)).training, LENGTHS)

    assert layout() is None  # the reference: batch_size rows in shuffled order
    grouped = layout("training.group_by_length=true", "training.batch_size=4")
    assert isinstance(grouped, GroupedRowsSchedule)
    assert all(len(grouped.micro_batch_indices(step, 0, 1, 2, rank)) == 4 for step in range(1, 50) for rank in (0, 1))
    assert isinstance(layout("training.batch_tokens=4096", "data.max_length=512"), TokenBudgetSchedule)
