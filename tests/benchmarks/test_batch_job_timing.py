"""benchmarks/batch_job.py reads the batch job's time split back from its log, and with
--batch-compile-cache runs the job twice on one compile cache folder (first, then warm), each run
labelled, split and in the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.batch_job import split_line, time_split
from benchmarks.serving_report import render, table_rows
from tests.conftest import ROOT

SPLIT = {
    "ray_start_s": 1.0, "plan_s": 2.0, "actors_ready_s": 30.0, "actor_start_s": 2.0, "load_s": 8.0,
    "warm_up_s": 20.0, "compile_cache": "loaded", "waiting_s": 0.5, "answering_s": 80.0, "writing_s": 1.5,
    "total_s": 115.0, "engines": [],
}  # fmt: skip


def test_the_last_timing_line_of_the_log_is_the_split():
    older = {**SPLIT, "total_s": 1.0}
    log = f"x\n(pid=1) batch timing: {json.dumps(older)}\nnoise\n12:00:00 batch: batch timing: {json.dumps(SPLIT)}\n"
    assert time_split(log) == SPLIT
    assert time_split("no such line") is None
    line = split_line(SPLIT)
    assert "actors ready 30.0 s" in line and "warm-up 20.0 s" in line and "compile cache loaded" in line


def test_the_table_shows_each_runs_label_split_and_engine_ready():
    run = {"actors": 1, "gpus_per_actor": 1, "tok_s": 1.0, "output_tokens": 1, "job_wall_s": 115.0,
           "process_wall_s": 120.0, "rows_written": 4, "error_rows": 0, "distinct_ids": 4}  # fmt: skip
    report = {"questions": 4, "runs": [{**run, "label": "compile cache warm", "time_split": SPLIT}]}
    table = render(table_rows({"batch": report}), markdown=True)
    assert "| batch | 1 actor(s) x 1 GPU, compile cache warm: time split | 115 | s | ray start 1.0, plan 2.0" in table
    assert "compile cache warm: engine ready | 28.00 | s | load 8.0 + warm-up 20.0 s, compile cache loaded |" in table


@pytest.mark.slow  # two tiny CPU batch jobs in their own benchmark process (~2-3 min)
def test_compile_cache_option_runs_the_job_twice_on_one_folder(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"How does habit {i} affect sleep?"} for i in range(5)]))
    out = tmp_path / "bench.json"
    args = ["--phases", "batch", "--model-name", "tiny-mistral", "--device", "cpu", "--batch-questions", "12",
            "--batch-max-tokens", "4", "--batch-gpus", "0", "--batch-max-batch-size", "4", "--alpaca", str(alpaca),
            "--batch-compile-cache", str(tmp_path / "cc"), "--work-dir", str(tmp_path / "work"),
            "--json-out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the test session's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serving", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = json.loads(out.read_text())["phases"]["batch"]["runs"]
    assert [r["label"] for r in runs] == ["compile cache first", "compile cache warm"]
    for run in runs:
        assert f"engine.compile_cache={tmp_path / 'cc'}" in run["command"] and run["rows_written"] == 12
        split = run["time_split"]
        assert split["load_s"] > 0 and split["compile_cache"] == "missing, nothing compiled"  # CPU: eager
