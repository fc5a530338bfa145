"""Resume retries rows whose generation failed (not rows with bad input), the output never holds an id
twice, and a job with too many generation failures reports failure. Real Ray Data, real Parquet, the
tiny Mistral; the first run's engine is the real one wrapped to fail on some prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.config import BatchJobConfig
from batch.output import OUTPUT_SCHEMA, answer_files, read_answers
from batch.pipeline import Summary, run_batch
from batch.retry import drop_failed_rows
from mistral_qa.configio import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "batch" / "configs" / "tiny.yaml"


class PoisonedEngine:
    """The real engine, except that any call holding a prompt with POISON fails (as a row the engine
    cannot answer would)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params, adapter=None, template_stop=()):
        if any("POISON" in p for p in prompts):
            raise RuntimeError("poisoned row")
        return self.engine.generate(prompts, params, adapter=adapter, template_stop=template_stop)


def poisoned_engine(cfg: BatchJobConfig) -> PoisonedEngine:
    from batch.pipeline import make_engine

    return PoisonedEngine(make_engine(cfg))


def write_questions(path: Path) -> None:
    """20 questions: 4 say POISON, 2 are blank (bad input)."""
    with path.open("w") as f:
        for i in range(20):
            question = "   " if i in (3, 4) else f"Question {i}{' POISON' if i % 5 == 0 else ''}?"
            f.write(json.dumps({"id": f"q{i:02d}", "question": question}) + "\n")


def errors_by_id(out: Path) -> dict[str, str]:
    return {r["id"]: (r["error"] or "").split(":")[0] for r in read_answers(str(out)).to_pylist()}


@pytest.mark.slow  # two Ray Data jobs: ~30-60 s on 2 cores; the unit tests below stay in the default run
def test_resume_retries_generation_failures_only_and_keeps_each_id_once(ray_session, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this file
    write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "answers"
    cfg = load_config(BatchJobConfig, TINY, ["compute.batch_size=10", "compute.batch_retries=0"])
    cfg.input.path, cfg.output.path = str(tmp_path / "q.jsonl"), str(out)

    first = run_batch(cfg, engine_factory=poisoned_engine)
    poisoned = {f"q{i:02d}" for i in (0, 5, 10, 15)}
    assert {i for i, kind in errors_by_id(out).items() if kind == "generation_failed"} == poisoned
    assert first.failed_fraction == 4 / 20 and "4 of 20 rows failed in generation" in first.failure(0.1)
    assert first.failure(0.25) is None

    second = run_batch(cfg)  # the real engine answers the poisoned rows
    table = read_answers(str(out))
    assert sorted(table.column("id").to_pylist()) == [f"q{i:02d}" for i in range(20)]  # each id once
    assert {i: k for i, k in errors_by_id(out).items() if k} == {"q03": "empty_question", "q04": "empty_question"}
    assert (second.retried, second.rows, second.skipped) == (4, 4, 16) and second.failure(0.0) is None


def write_answer_file(path: Path, ids: list[str], errors: list[str | None]) -> None:
    table = pa.Table.from_pylist(
        [{"id": i, "error": e, "answer": "", "completion_tokens": 0} for i, e in zip(ids, errors, strict=True)]
    )
    full = [table.column(f.name) if f.name in table.column_names else pa.nulls(len(ids), f.type) for f in OUTPUT_SCHEMA]
    pq.write_table(
        pa.Table.from_arrays([c.cast(f.type) for c, f in zip(full, OUTPUT_SCHEMA, strict=True)], schema=OUTPUT_SCHEMA),
        path,
    )


def test_drop_failed_rows_rewrites_only_files_with_generation_failures(tmp_path):
    write_answer_file(tmp_path / "part-1.parquet", ["a", "b", "c"], [None, "generation_failed: x", "too_long: y"])
    write_answer_file(tmp_path / "part-2.parquet", ["d"], ["generation_failed: z"])
    write_answer_file(tmp_path / "part-3.parquet", ["e"], ["unreadable: line 5"])
    untouched = (tmp_path / "part-3.parquet").stat().st_mtime_ns
    assert drop_failed_rows(str(tmp_path)) == 2
    assert [Path(p).name for p in answer_files(str(tmp_path))] == ["part-1.parquet", "part-3.parquet"]
    assert errors_by_id(tmp_path) == {"a": "", "c": "too_long", "e": "unreadable"}
    assert (tmp_path / "part-3.parquet").stat().st_mtime_ns == untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-1.parquet", "part-3.parquet"]  # no temp files


def test_the_summary_counts_only_generation_failures_against_the_limit():
    summary = Summary(output="x", rows=10, errors={"empty_question": 5, "generation_failed": 1})
    assert summary.failed_fraction == 0.1 and summary.failure(0.1) is None
    assert "1 of 10 rows failed in generation" in summary.failure(0.05)
    assert Summary(output="x").failure(0.0) is None  # nothing answered: nothing failed
