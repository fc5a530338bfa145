"""train/benchmark.py end to end on CPU with the tiny Mistral: both phases run and the per-token losses
of the project's step agree with HF's (the script exits 1 when they do not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # loads two models and runs the Trainer (~30-60 s)
def test_benchmark_runs_both_phases_and_the_losses_agree(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--model-name", "tiny-mistral", "--data", "builtin:mobile_health", "--device", "cpu", "--steps", "2"]
    args += [
        "--warmup",
        "1",
        "--max-length",
        "256",
        "--batch-tokens",
        "512",
        "--check-rows",
        "16",
        "--json-out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "train.benchmark", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "A  HF Trainer + PEFT, 8 rows/batch" in result.stdout
    assert "B  project, 512-token batches" in result.stdout
    assert "-> PASS" in result.stdout
    report = json.loads(out.read_text())
    assert "B' the same batches again" in result.stdout and "speedup (non-pad tok/s, B'/A)" in result.stdout
    baseline, project, again = report["results"]
    for r in (baseline, project, again):
        assert r["steps"] == 2 and r["tokens"] > 0 and r["s_per_step"] > 0 and r["mfu_pct"] is None  # no MFU on CPU
    assert len(project["step_seconds"]) == 2 and sum(project["step_seconds"]) == pytest.approx(project["seconds"])
    assert (again["tokens"], again["padded_tokens"]) == (project["tokens"], project["padded_tokens"])
    assert baseline["rows"] == 16  # 2 steps x 8 rows
    assert project["padding_pct"] < baseline["padding_pct"]
    check = report["agreement"]
    assert check["agree"] and check["rows"] == 16 and check["max_abs_diff"] < 1e-4


def test_fixed_row_batches_for_the_ladder(tmp_path):
    """--batch-tokens 0: the project's step on --baseline-batch rows per batch (no length grouping),
    to measure what grouping buys on its own; the losses still agree with HF's."""
    out = tmp_path / "bench.json"
    args = ["--model-name", "tiny-mistral", "--data", "builtin:mobile_health", "--device", "cpu", "--steps", "2"]
    args += ["--warmup", "1", "--max-length", "256", "--batch-tokens", "0", "--skip-baseline", "--no-second-pass"]
    args += ["--check-rows", "8", "--json-out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "train.benchmark", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "B  project, 8 rows/batch" in result.stdout and "-> PASS" in result.stdout
    [project] = json.loads(out.read_text())["results"]
    assert project["rows"] == 16 and project["padded_tokens"] > project["tokens"]  # 2 steps x 8 rows, padded
