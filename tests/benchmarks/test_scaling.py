"""python -m benchmarks.scaling on real Ray (local, CPU): one tiny training run per worker count, one table."""

from __future__ import annotations

import json

import pytest

from benchmarks.scaling import add_efficiency, main, summarise
from tests.conftest import ROOT
from train.report import read_metrics


def test_medians_leave_out_the_warmup_and_efficiency_is_per_worker():
    records = [
        {"step": s, "nonpad_tokens_per_s": t, "peak_memory_gib": m} for s, t, m in [(1, 5, 1), (2, 80, 2), (3, 100, 2)]
    ]
    rows = [summarise(records[:2], 1, warmup=1), summarise(records, 2, warmup=1)]
    assert [r["total_nonpad_tokens_per_s"] for r in rows] == [80, 90]
    assert [r["peak_memory_gib"] for r in rows] == [2, 2]
    add_efficiency(rows)
    assert [r["efficiency_pct"] for r in rows] == [100, 100 * 45 / 80]
    with pytest.raises(ValueError, match="no steps after"):
        summarise(records, 1, warmup=3)


@pytest.mark.slow  # ~100 s on 2 busy cores: two training runs, each starting its own worker group
def test_scaling_runs_each_worker_count_and_reports_throughput(ray_session, tmp_path, capsys):
    out = tmp_path / "scaling.json"
    paths = [f"run.output_dir={tmp_path / 'outputs'}", f"run.storage_path={tmp_path / 'ray'}"]
    argv = ["--config", str(ROOT / "train/configs/tiny.yaml"), "--workers", "1", "2", "--steps", "5"]
    assert main([*argv, "--warmup", "2", "--json-out", str(out), *paths]) == 0

    runs = json.loads(out.read_text())["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    for run in runs:
        records = read_metrics(f"{run['run_dir']}/metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        assert [r["step"] for r in records if "eval_loss" in r] == [5]  # evaluated only at the end
        assert run["steps_measured"] == 3 and run["peak_memory_gib"] > 0
        assert run["total_nonpad_tokens_per_s"] == run["per_worker_nonpad_tokens_per_s"] * run["workers"] > 0
    one, two = runs
    assert one["efficiency_pct"] == 100
    assert two["efficiency_pct"] == 100 * two["per_worker_nonpad_tokens_per_s"] / one["per_worker_nonpad_tokens_per_s"]
    assert one["run_dir"] != two["run_dir"]

    header, *rows = capsys.readouterr().out.splitlines()[-3:]
    for title in ("workers", "per-GPU non-pad tok/s", "total non-pad tok/s", "per-GPU efficiency", "peak memory GiB"):
        assert title in header
    assert [row.split()[0] for row in rows] == ["1", "2"] and rows[0].split()[3] == "100%"
