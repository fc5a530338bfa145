"""The batch job: the answering actor with a stand-in engine (no Ray), then the whole pipeline on real
Ray Data (local, CPU) with the tiny Mistral and the session's tiny adapter: 1,000 questions, broken
rows, a killed job resumed, and batch answers checked against the engine one prompt at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.__main__ import main
from batch.config import BatchJobConfig
from batch.io import INPUT_SCHEMA
from batch.output import OUTPUT_SCHEMA, answer_files, read_answers
from batch.pipeline import Answerer, build_prompts, run_batch
from mistral_qa.configio import load_config
from mistral_qa.engine.stats import EngineStats

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "batch" / "configs" / "tiny.yaml"


def batch_config(questions: Path, output: Path, *overrides: str) -> BatchJobConfig:
    cfg = load_config(BatchJobConfig, TINY, list(overrides))
    cfg.input.path, cfg.output.path = str(questions), str(output)
    return cfg


def write_questions(path: Path, n: int) -> list[str]:
    """n questions, every other one with an explicit id; returns the ids the job must produce."""
    ids = []
    with path.open("w") as f:
        for i in range(n):
            row = {"question": f"How does screen time number {i} affect sleep?"}
            if i % 2 == 0:
                row["id"] = f"q{i:04d}"
            f.write(json.dumps(row) + "\n")
            ids.append(row.get("id", f"{path.name}:{i + 1}"))
    return ids


# --- the answering actor, without Ray ---------------------------------------------------------------


@dataclass
class FakeCompletion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class FlakyEngine:
    """Fails the first attempt at every multi-prompt batch, and always on a prompt saying POISON."""

    max_context = 40
    model_config = SimpleNamespace(name="flaky")

    def __init__(self):
        self.seen: set = set()
        self.calls = 0

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stats(self, since=None) -> dict:
        return EngineStats().snapshot()

    def generate(self, prompts, params, adapter=None, template_stop=()):
        self.calls += 1
        if len(prompts) > 1 and tuple(prompts) not in self.seen:
            self.seen.add(tuple(prompts))
            raise RuntimeError("transient")
        if any("POISON" in p for p in prompts):
            raise ValueError("poisoned row")
        return [FakeCompletion(f"answer {len(p)}", "stop", len(p.split()), 2) for p in prompts]


def input_batch(rows: list[dict]) -> pa.Table:
    full = [{"id": r["id"], "question": r.get("question"), "context": None, "error": r.get("error")} for r in rows]
    return build_prompts(pa.Table.from_pylist(full, schema=INPUT_SCHEMA))


def test_answerer_retries_a_failing_batch_then_isolates_the_bad_row(tmp_path):
    cfg = batch_config(tmp_path / "q.jsonl", tmp_path / "out", "compute.batch_retries=1")
    answerer = Answerer(cfg.model_dump(mode="json"), pa.array(["done"]), engine_factory=lambda _: FlakyEngine())
    clean = answerer(input_batch([{"id": "a", "question": "one?"}, {"id": "b", "question": "two?"}]))
    assert clean.column("error").to_pylist() == [None, None] and answerer.engine.calls == 2  # failed once, retried
    rows = [
        {"id": "done", "question": "answered last run"},
        {"id": "c", "question": "fine?"},
        {"id": "d", "question": "POISON?"},
        {"id": "e", "question": "word " * 40},
        {"id": "f", "question": None, "error": "unreadable: line 6"},
    ]
    out = answerer(input_batch(rows))
    assert out.schema.equals(OUTPUT_SCHEMA)
    got = {r["id"]: (r["error"] or "").split(":")[0] for r in out.to_pylist()}
    assert got == {"c": "", "d": "generation_failed", "e": "too_long", "f": "unreadable"}  # "done" is skipped
    row = out.to_pylist()[0]
    assert row["answer"].startswith("answer") and row["completion_tokens"] == 2 and row["model"] == "flaky"
    assert all(r["answer"] == "" and r["completion_tokens"] == 0 for r in out.to_pylist()[1:])
    assert (row["max_tokens"], row["temperature"], row["top_p"]) == (8, 0.0, 1.0)


def test_cli_reports_bad_input_config_and_adapter_before_ray_starts(tmp_path, capsys):
    write_questions(tmp_path / "q.jsonl", 3)
    paths = ["--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "out")]
    assert main(["--config", str(TINY), "generation.max_tokenz=3"]) == 2
    assert main(["--config", str(TINY)]) == 1
    assert main(["--config", str(TINY), "--input", str(tmp_path / "none.jsonl"), "--output", "x"]) == 1
    assert main(["--config", str(TINY), *paths, f"adapter={tmp_path / 'no-adapter'}"]) == 1
    err = capsys.readouterr().err
    for message in ("max_tokenz: unknown key", "set input.path", "does not exist", "no such folder"):
        assert message in err
    assert not (tmp_path / "out").exists()


# --- the whole job on Ray Data -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def thousand(ray_session, tiny_adapter, tmp_path_factory):
    """1,000 questions answered once by the tiny Mistral + the session's tiny adapter."""
    tmp = tmp_path_factory.mktemp("batch1000")
    ids = write_questions(tmp / "questions.jsonl", 1000)
    cfg = batch_config(tmp / "questions.jsonl", tmp / "answers", f"adapter={tiny_adapter}")
    return SimpleNamespace(cfg=cfg, ids=ids, summary=run_batch(cfg), adapter=str(tiny_adapter))


def test_read_blocks_hold_one_engine_call_each(ray_session, tmp_path):
    """Every engine call gets exactly compute.batch_size rows (the last one fewer), whatever blocks the
    reads produce."""
    from batch.io import list_inputs
    from batch.pipeline import question_blocks

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_questions(first, 50)
    write_questions(second, 20)
    cfg = batch_config(tmp_path, tmp_path / "out", "compute.batch_size=16")
    blocks = question_blocks(cfg, list_inputs(str(tmp_path)))
    sizes = sorted(b.num_rows for b in blocks.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert sizes == [6, 16, 16, 16, 16]


class RecordingEngine:
    """The real engine, with each generate call's start and end appended to a file (an observer)."""

    def __init__(self, engine, record: Path):
        self.engine, self.record = engine, record

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params, adapter=None, template_stop=()):
        started = time.time()
        try:
            return self.engine.generate(prompts, params, adapter=adapter, template_stop=template_stop)
        finally:
            with self.record.open("a") as f:
                f.write(f"{started} {time.time()}\n")


def recording_engine(cfg: BatchJobConfig) -> RecordingEngine:
    from batch.pipeline import make_engine

    return RecordingEngine(make_engine(cfg), Path(cfg.output.path).parent / "calls.txt")


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


@pytest.mark.slow  # two real batch jobs, ~25 s
@pytest.mark.parametrize("calls", [1, 2])  # 1: the contrast
def test_an_actor_runs_calls_per_actor_engine_calls_at_once(ray_session, tmp_path, calls):
    """With 2, the next call's questions join the engine while the last call's answers finish."""
    questions = tmp_path / "questions.jsonl"
    write_questions(questions, 48)
    cfg = batch_config(
        questions,
        tmp_path / "answers",
        "compute.batch_size=8",
        f"compute.calls_per_actor={calls}",
        "output.mode=overwrite",
    )
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this file
    summary = run_batch(cfg, engine_factory=recording_engine)
    assert summary.rows == 48 and not summary.errors
    intervals = [tuple(map(float, line.split())) for line in (tmp_path / "calls.txt").read_text().splitlines()]
    assert len(intervals) == 6 and most_at_once(intervals) == calls


def test_thousand_questions_give_one_row_each_with_the_fixed_schema(thousand):
    files = answer_files(thousand.cfg.output.path)
    assert files and all(pq.read_schema(f).equals(OUTPUT_SCHEMA) for f in files)
    table = read_answers(thousand.cfg.output.path)
    ids = table.column("id").to_pylist()
    assert len(ids) == 1000 and sorted(ids) == sorted(thousand.ids)
    assert table.column("error").null_count == 1000 and table.schema.field("error").type == pa.string()
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert max(table.column("completion_tokens").to_pylist()) <= 8
    assert set(table.column("model").to_pylist()) == {"tiny-mistral"}
    assert set(table.column("adapter").to_pylist()) == {thousand.adapter}
    assert set(table.column("top_k").to_pylist()) == {0} and set(map(tuple, table.column("stop").to_pylist())) == {()}
    summary = thousand.summary
    assert (summary.rows, summary.skipped, sum(summary.errors.values())) == (1000, 0, 0)
    assert summary.completion_tokens == sum(table.column("completion_tokens").to_pylist()) > 0
    sizes = sorted(pq.read_metadata(f).num_rows for f in files)
    assert summary.files == len(files) and all(n >= 200 for n in sizes[1:])  # output.rows_per_file=200


def test_thousand_questions_report_their_time_split(thousand):
    """batch/timing.py's split of this job (tests/batch/test_batch_timing.py has the rest)."""
    times = thousand.summary.timing
    parts = [times.ray_start_s, times.plan_s, times.actors_ready_s, times.waiting_s, times.answering_s, times.writing_s]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(times.total_s, abs=0.05)
    assert times.load_s > 0 and times.answering_s > 0 and len(times.engines) == 1
    # The engine's start-up in parts: the actor's process and engine build, the load's, the warm-up's.
    engine = times.engines[0]
    assert engine["tokenizer_s"] > 0 and engine["model_s"] > 0 and engine["adapters_s"] > 0
    assert engine["tokenizer_s"] + engine["model_s"] + engine["adapters_s"] <= engine["load_s"]
    assert engine["cache_load_s"] >= 0 and engine["first_answer_s"] > 0 and engine["cache_save_s"] >= 0
    assert engine["first_answer_s"] <= engine["warm_up_s"]
    # CPU: the engine runs eagerly, so its warm-up compiles nothing and records no CUDA graph.
    assert engine["compile_s"] == 0 and engine["graph_capture_s"] == 0
    assert engine["process_s"] > 0 and engine["engine_build_s"] >= engine["load_s"] + engine["warm_up_s"]


def test_greedy_batch_answers_equal_the_engine_one_prompt_at_a_time(thousand):
    from mistral_qa.engine import Engine, EngineConfig, SamplingParams
    from mistral_qa.prompt import build_prompt

    cfg = thousand.cfg
    engine = Engine(EngineConfig(model=cfg.model, adapters={"tiny": thousand.adapter}, device="cpu", dtype="float32"))
    rows = read_answers(cfg.output.path).to_pylist()[::100]
    for row in rows:
        [single] = engine.generate([build_prompt(row["question"])], SamplingParams(max_tokens=8), adapter="tiny")
        expected = (row["answer"], row["finish_reason"], row["completion_tokens"])
        assert (single.text, single.finish_reason, single.completion_tokens) == expected, row["id"]
    engine.close()


def write_broken_file(path: Path) -> dict[str, str]:
    """200 rows, 10 of them (5%) broken in several ways; returns {id: expected error kind}."""
    broken = {
        7: '{"question": "unterminated',
        23: "[1, 2, 3]",
        41: json.dumps({"question": 42}),
        59: json.dumps({"question": ["a", "list"]}),
        77: json.dumps({"question": ""}),
        95: json.dumps({"question": "   "}),
        113: json.dumps({"prompt": "wrong key"}),
        131: json.dumps({"question": "why? " * 60}),
        149: json.dumps({"question": "long " * 80}),
    }
    kinds = dict.fromkeys([7, 23, 167], "unreadable") | dict.fromkeys([41, 59], "non_text")
    kinds |= (
        dict.fromkeys([77, 95], "empty_question") | {113: "missing_question"} | dict.fromkeys([131, 149], "too_long")
    )
    with path.open("wb") as f:
        for line in range(1, 201):
            if line == 167:
                f.write(b'{"question": "bad \xff bytes"}\n')
            else:
                f.write((broken.get(line) or json.dumps({"question": f"good question {line}?"})).encode() + b"\n")
    return {f"{path.name}:{line}": kind for line, kind in kinds.items()}


def test_broken_rows_are_counted_exactly_and_the_job_goes_on(ray_session, tiny_adapter, tmp_path, capsys):
    expected = write_broken_file(tmp_path / "mixed.jsonl")
    paths = ["--input", str(tmp_path / "mixed.jsonl"), "--output", str(tmp_path / "out")]
    # model: null takes the base from the adapter's training_config.yaml, as the quickstart config does
    overrides = ["engine.max_context=80", "model=null", f"adapter={tiny_adapter}"]
    assert main(["--config", str(TINY), *paths, "--show", "3", *overrides]) == 0
    table = read_answers(str(tmp_path / "out"))
    assert table.num_rows == 200 and len(set(table.column("id").to_pylist())) == 200
    errors = {r["id"]: r["error"].split(":")[0] for r in table.to_pylist() if r["error"]}
    assert errors == expected
    assert all(r["answer"] == "" and r["completion_tokens"] == 0 for r in table.to_pylist() if r["error"])
    assert all(r["completion_tokens"] > 0 for r in table.to_pylist() if not r["error"])
    assert set(table.column("model").to_pylist()) == {"tiny-mistral"}
    printed = capsys.readouterr().out
    assert "rows answered:   200" in printed
    assert (
        "errors:          10 (empty_question: 2, missing_question: 1, non_text: 2, too_long: 2, unreadable: 3)"
        in printed
    )
    assert printed.count("  Q: ") == 3


def test_killed_job_resumes_without_loss_or_duplicates(ray_session, tmp_path):
    """Kill a running `python -m batch` (its driver: Ray then stops its actors), rerun, compare."""
    ids = write_questions(tmp_path / "q.jsonl", 600)
    out = tmp_path / "answers"
    paths = ["--input", str(tmp_path / "q.jsonl"), "--output", str(out)]
    cmd = [sys.executable, "-m", "batch", "--config", str(TINY), *paths, "output.rows_per_file=20"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # the session's cluster
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not answer_files(str(out)) and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    time.sleep(2)  # a job whose driver died must not write on
    before = read_answers(str(out)).column("id").to_pylist()
    assert 0 < len(before) < 600, f"the job was not stopped halfway ({len(before)} rows); see {tmp_path / 'job.log'}"
    assert len(set(before)) == len(before)

    summary = run_batch(batch_config(tmp_path / "q.jsonl", out))
    after = read_answers(str(out)).column("id").to_pylist()
    assert sorted(after) == sorted(ids)  # every row exactly once
    assert (summary.skipped, summary.rows) == (len(before), 600 - len(before))
    assert not [p for p in os.listdir(out) if not p.endswith(".parquet")]  # no temp files left
