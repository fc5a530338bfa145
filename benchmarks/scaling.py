"""Scaling: run the same training job with 1, 2, 4, ... workers and compare their throughput.

    python -m benchmarks.scaling --config train/configs/mistral7b_random.yaml --workers 1 2 4 --steps 60 \\
        data.source=.device/alpaca_en_demo.json                                     # GPUs
    python -m benchmarks.scaling --config train/configs/tiny.yaml --workers 1 2 --steps 8 --warmup 2   # CPU, a minute

Each worker count is a full `python -m train` run (run_training) under its own run name, evaluating
and checkpointing only at its last step. The batch per worker stays fixed, so the global batch grows
with the workers (weak scaling). Read from each run's metrics.jsonl, after `--warmup` steps:
the median per-worker (per-GPU) and total non-padding tokens/s, the per-worker efficiency against
the smallest worker count (100% = perfect scaling), and the peak memory of a worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from mistral_qa.configio import load_config
from mistral_qa.data import DataSourceError
from mistral_qa.entry import run_main
from mistral_qa.model import ModelLoadError
from mistral_qa.preflight import PreflightError
from train.config import TrainJobConfig
from train.report import read_metrics

COLUMNS = (
    ("workers", "workers", "{}"),
    ("per_worker_nonpad_tokens_per_s", "per-GPU non-pad tok/s", "{:,.0f}"),
    ("total_nonpad_tokens_per_s", "total non-pad tok/s", "{:,.0f}"),
    ("efficiency_pct", "per-GPU efficiency", "{:.0f}%"),
    ("peak_memory_gib", "peak memory GiB", "{:.1f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="training YAML (train/configs/)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run, in order")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the medians")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no step of --steps {args.steps} to measure")
    return args


def run_config(args: argparse.Namespace, workers: int, name: str) -> TrainJobConfig:
    """The job config of one run: the user's overrides, then what this benchmark fixes."""
    at_end_only = [f"training.eval_every={args.steps}", "training.eval_batches=1", "run.num_to_keep=1"]
    fixed = [f"scaling.num_workers={workers}", f"training.max_steps={args.steps}", f"run.name={name}"]
    return load_config(TrainJobConfig, args.config, [*at_end_only, *args.overrides, *fixed])


def summarise(records: list[dict], workers: int, warmup: int) -> dict:
    """Medians over the steps after warmup (nonpad_tokens_per_s in metrics.jsonl is all workers' total)."""
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise ValueError(f"no steps after the {warmup} warmup steps; raise --steps or lower --warmup")
    total = statistics.median(r["nonpad_tokens_per_s"] for r in timed)
    return {
        "workers": workers,
        "per_worker_nonpad_tokens_per_s": total / workers,
        "total_nonpad_tokens_per_s": total,
        "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
        "steps_measured": len(timed),
    }


def add_efficiency(rows: list[dict]) -> None:
    """Per-worker throughput as a percentage of the smallest worker count's."""
    base = min(rows, key=lambda r: r["workers"])["per_worker_nonpad_tokens_per_s"]
    for row in rows:
        row["efficiency_pct"] = 100 * row["per_worker_nonpad_tokens_per_s"] / base


def format_table(rows: list[dict]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    cells += [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def run_scaling(args: argparse.Namespace) -> list[dict]:
    """One training run per worker count (the largest checked against the cluster first); a row each."""
    import ray

    from train.launch import check_resources, run_training  # imports Ray: only once the arguments are read

    name = load_config(TrainJobConfig, args.config, args.overrides).run.name
    stamp = time.strftime("%Y%m%d-%H%M%S")  # a fresh run name each time: the same name would resume
    configs = {n: run_config(args, n, f"{name}-scaling-{stamp}-{n}w") for n in args.workers}
    if not ray.is_initialized():
        ray.init()
    check_resources(configs[max(configs)])  # fail before the first run, not after it
    rows = []
    for workers, cfg in configs.items():
        out = run_training(cfg)
        row = summarise(read_metrics(out / "metrics.jsonl"), workers, args.warmup)
        rows.append({**row, "run_dir": str(out)})
    add_efficiency(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: scaling(args), lambda: (ModelLoadError, DataSourceError, PreflightError))


def scaling(args: argparse.Namespace) -> int:
    rows = run_scaling(args)
    print(format_table(rows))
    if args.json_out:
        settings = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup}
        args.json_out.write_text(json.dumps({**settings, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
