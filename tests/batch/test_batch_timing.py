"""The batch job's time split (batch/timing.py): Ray start, plan, actors ready (actor start, model load,
warm-up), waiting, answering, writing; the parts add up to the job's total. A real local-Ray run on
the tiny Mistral, and the arithmetic on its own."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from batch.config import BatchJobConfig
from batch.pipeline import run_batch
from batch.timing import JobClock, read_clock, split, tell
from mistral_qa.configio import load_config

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("ray_start_s", "plan_s", "actors_ready_s", "waiting_s", "answering_s", "writing_s")


def test_split_parts_add_up_and_engine_parts_come_from_the_first_ready_engine():
    marks = {"start": 100.0, "ray_start": 101.0, "ray_started": 104.0, "submitted": 105.0, "end": 150.0}
    engines = [
        {"at": 120.0, "load_s": 6.0, "warm_up_s": 8.0, "compile_cache": {"status": "loaded", "save": ""}},
        {"at": 125.0, "load_s": 9.0, "warm_up_s": 9.0},
    ]
    times = split(marks, {"engines": engines, "first_call": 121.0, "last_call": 147.0})
    assert (times.ray_start_s, times.plan_s, times.actors_ready_s) == (3.0, 2.0, 15.0)
    assert (times.actor_start_s, times.load_s, times.warm_up_s, times.compile_cache) == (1.0, 6.0, 8.0, "loaded")
    assert (times.waiting_s, times.answering_s, times.writing_s, times.total_s) == (1.0, 26.0, 3.0, 50.0)
    assert sum(getattr(times, p) for p in PARTS) == times.total_s


def test_a_job_with_nothing_to_answer_counts_its_run_as_writing():
    marks = {"start": 0.0, "ray_start": 1.0, "ray_started": 2.0, "submitted": 3.0, "end": 7.0}
    times = split(marks, {"engines": [], "first_call": None, "last_call": None})
    assert (times.actors_ready_s, times.answering_s, times.writing_s, times.total_s) == (0.0, 0.0, 4.0, 7.0)


@pytest.mark.slow  # a job of its own (~30 s); the default run checks the split of test_batch_pipeline's job
def test_a_real_job_reports_its_split(ray_session, tmp_path, caplog):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Is screen time {i} bad?"}) + "\n" for i in range(16)))
    cfg = load_config(
        BatchJobConfig,
        ROOT / "batch" / "configs" / "tiny.yaml",
        ["compute.batch_size=8", "generation.max_tokens=4", f"engine.compile_cache={tmp_path / 'cc'}"],
    )
    cfg.input.path, cfg.output.path = str(questions), str(tmp_path / "answers")
    with caplog.at_level(logging.INFO, logger="batch"):
        summary = run_batch(cfg)
    assert summary.rows == 16
    times = summary.timing
    assert all(getattr(times, p) >= 0 for p in PARTS)
    assert sum(getattr(times, p) for p in PARTS) == pytest.approx(times.total_s, abs=0.05)
    assert times.total_s <= summary.wall_s
    assert times.actors_ready_s > 0 and times.answering_s > 0 and times.load_s > 0 and times.warm_up_s > 0
    assert times.actors_ready_s >= times.load_s + times.warm_up_s
    assert len(times.engines) == 1 and times.compile_cache == "missing, nothing compiled"  # CPU: eager, no artifact
    lines = "\n".join(summary.lines())
    assert "time split:" in lines and "warm-up" in lines and "compile cache missing" in lines
    logged = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("batch timing: "))
    assert json.loads(logged.removeprefix("batch timing: "))["answering_s"] == times.answering_s


def test_a_lost_clock_costs_the_split_not_the_job(ray_session, caplog):
    """The actors' marks and the driver's read log a warning when the clock actor is gone."""
    import ray

    clock = JobClock.remote()
    tell(clock, "engine_call", 1.0, 2.0)
    assert read_clock(clock)["first_call"] == 1.0
    ray.kill(clock)
    wait_until_dead(clock)  # ray.kill returns before the actor is gone: a call right after it can still land
    with caplog.at_level(logging.WARNING, logger="batch"):
        tell(clock, "engine_call", 3.0, 4.0)
        assert read_clock(clock) == {"engines": [], "first_call": None, "last_call": None}
    assert "could not report engine_call" in caplog.text and "could not read the job's clock" in caplog.text


def wait_until_dead(actor, timeout_s: float = 60.0) -> None:
    import ray
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.read.remote(), timeout=10)
        except RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the actor was still answering {timeout_s:.0f} s after ray.kill")
