"""benchmarks/train_step.py on CPU with the tiny Mistral: every phase (three Trainer baselines, the project's
step twice, the loss check) runs and is timed the same way, the grouped baseline really groups, and the
report names the strongest baseline. The search for the largest batch that fits is tested on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.baselines import hf_trainer
from benchmarks.train_report import Result, speedups
from benchmarks.train_step import LORA, load_items, parse_args
from mistral_qa.model import ModelConfig, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model-name", "tiny-mistral", "--data", "builtin:mobile_health", "--device", "cpu", "--max-length", "256"]


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "benchmarks.train_step", *TINY, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow  # loads four models and runs the Trainer three times (~2-3 min on 2 busy cores)
def test_every_phase_is_timed_the_same_way_and_the_losses_agree(tmp_path):
    out = tmp_path / "bench.json"
    result = run_benchmark(
        *["--steps", "3", "--warmup", "1", "--batch-tokens", "512", "--largest-batches", "16", "12"],
        *["--check-rows", "16", "--json-out", str(out)],
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("device: cpu") :]  # the final table, printed last
    for name in ("A1 Trainer, 8 rows, padded", "A2 Trainer, 8 rows, group_by_length"):
        assert name in table
    assert "A3 Trainer, 16 rows, group_by_length" in table  # the largest candidate: nothing runs out on a CPU
    assert "B  project, 512-token batches" in table and "B' the same batches again" in table
    assert "1 warm-up + 3 timed steps per phase" in table and "s/step median [p10-p90]" in table
    assert "speed-up B / strongest baseline (A" in table and "-> PASS" in table
    report = json.loads(out.read_text())
    assert "transformers 5." in report["versions"]
    results = report["results"]
    assert [r["name"][:2] for r in results] == ["A1", "A2", "A3", "B ", "B'"]
    for r in results:
        assert r["steps"] == 3 and len(r["step_seconds"]) == 3 and r["mfu_pct"] is None  # no MFU on CPU
        assert r["s_per_step_p10"] <= r["s_per_step"] <= r["s_per_step_p90"]
        assert r["seconds"] == pytest.approx(sum(r["step_seconds"]))
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    a1, a2, a3, b, again = results
    assert (a1["rows"], a2["rows"], a3["rows"]) == (24, 24, 48)
    assert a3["notes"] == {"out_of_memory": []}
    assert a2["padding_pct"] < a1["padding_pct"] / 3  # group_by_length grouped
    assert (again["tokens"], again["padded_tokens"]) == (b["tokens"], b["padded_tokens"])
    check = report["agreement"]
    assert check["agree"] and check["rows"] == 16 and check["max_abs_diff"] < 1e-4


@pytest.mark.slow  # two Trainer runs (~20 s of CPU, over a minute on 2 busy cores)
def test_the_grouped_trainer_baseline_groups_by_length():
    """transformers' own length grouping is on in the grouped baseline: its batches pad far less than
    the padded baseline's, on the same rows with the same batch size (each run: 1 warm-up + 2 steps)."""
    model_cfg = ModelConfig(source="random", name="tiny-mistral")
    tokenizer = load_tokenizer(model_cfg)
    items = load_items("builtin:mobile_health", tokenizer, 256)
    cpu = torch.device("cpu")

    def padding(grouped: bool) -> float:
        seconds, batches = hf_trainer.run_trainer(model_cfg, LORA, items, tokenizer, 8, grouped, 1, 2, 0, cpu)
        assert len(seconds) == 2 and all(s > 0 for s in seconds) and len(batches) == 2
        return 1 - sum(sum(lengths) for lengths, _ in batches) / sum(padded for _, padded in batches)

    grouped, padded = padding(True), padding(False)
    assert padded > 0.15 and grouped < padded / 3, (grouped, padded)


def test_the_largest_batch_that_fits_is_found_largest_first():
    tried, cleaned = [], []

    def run(size: int) -> str:
        tried.append(size)
        if size > 24:
            raise torch.OutOfMemoryError(f"{size} rows")
        return f"ran {size}"

    size, result, out_of_memory = hf_trainer.largest_that_fits([16, 40, 24, 32], run, lambda: cleaned.append(1))
    assert (size, result, out_of_memory) == (24, "ran 24", [40, 32])
    assert tried == [40, 32, 24] and len(cleaned) == 2  # memory freed after each failure
    with pytest.raises(torch.OutOfMemoryError, match="no batch size"):
        hf_trainer.largest_that_fits([32, 40], run, lambda: None)


def step_result(name: str, seconds: list[float], tokens_per_step: int, baseline: bool) -> Result:
    lengths = [[tokens_per_step // 2] * 2 for _ in seconds]
    result = Result(name, seconds, lengths, [tokens_per_step] * len(seconds), 0.0, 1.0, baseline=baseline)
    return result.finish(None)


def test_the_median_step_is_reported_and_speedups_use_the_strongest_baseline():
    slow_outlier = step_result("A1 padded", [1.0, 1.0, 1.0, 1.0, 9.0], 1000, baseline=True)
    assert slow_outlier.s_per_step == 1.0 and slow_outlier.step_tokens_per_s == 1000  # one slow step moves no median
    assert slow_outlier.s_per_step_p90 > 1.0 and slow_outlier.tokens_per_s == pytest.approx(5000 / 13)
    strong = step_result("A3 grouped", [1.0] * 5, 3000, baseline=True)
    ours = step_result("B  project", [1.0] * 5, 6000, baseline=False)
    [line] = speedups([slow_outlier, strong, ours])
    assert line.startswith("speed-up B / strongest baseline (A3): 2.00x") and "2.00x median step" in line


def test_options_that_cannot_work_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--grouped-rows", "--batch-tokens", "4096"])
    assert "--grouped-rows needs --batch-tokens 0" in capsys.readouterr().err
    assert parse_args(["--skip-baseline"]).baselines == []
    assert parse_args([]).warmup == 10 and parse_args([]).steps == 50  # the minimum by default


@pytest.mark.slow  # ~17 s of benchmark code, not the product
def test_fixed_row_batches_for_the_ladder(tmp_path):
    """--batch-tokens 0: the project's step on --baseline-batch rows per batch (no length grouping),
    to measure what grouping buys on its own; the losses still agree with HF's."""
    out = tmp_path / "bench.json"
    result = run_benchmark(
        *["--steps", "2", "--warmup", "1", "--batch-tokens", "0", "--skip-baseline", "--no-second-pass"],
        *["--check-rows", "8", "--json-out", str(out)],
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "B  project, 8 rows/batch" in result.stdout and "-> PASS" in result.stdout
    [project] = json.loads(out.read_text())["results"]
    assert project["rows"] == 16 and project["padded_tokens"] > project["tokens"]  # 2 steps x 8 rows, padded


@pytest.mark.slow  # the project's step on grouped 8-row batches (the reference schedule's fast mode)
def test_grouped_rows_keep_eight_rows_a_step_with_little_padding(tmp_path):
    out = tmp_path / "bench.json"
    result = run_benchmark(
        *["--steps", "3", "--warmup", "1", "--batch-tokens", "0", "--grouped-rows", "--skip-baseline"],
        *["--no-second-pass", "--check-rows", "0", "--json-out", str(out)],
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    [project] = json.loads(out.read_text())["results"]
    assert project["name"] == "B  project, 8 rows/batch, grouped"
    assert [len(lengths) for lengths in project["step_lengths"]] == [8, 8, 8] and project["padding_pct"] < 10
