"""The real batch job, `python -m batch`, run as its own process (entrypoints never import each
other) on this benchmark's Ray instance, then its Parquet output counted and its time split (the
job's "batch timing:" line: Ray start, plan, actors ready with model load and warm-up, answering,
writing) read back.

With a compile cache folder (--batch-compile-cache) the job runs twice on it: the first run's
engines compile and save their artifacts (unless the folder already holds them), the second run's
load them, so "engine ready" is reported cold and warm. Each of those runs gets its own empty
Inductor and Triton caches, so the folder is the only thing that can make the second run warm, as
on a fresh node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads

from mistral_qa.engine.stats import summary

from .profiling import Work, merged_length

ROOT = Path(__file__).resolve().parents[1]


def job_overrides(
    model_name: str,
    actors: int,
    gpus_per_actor: float,
    engine: dict,
    max_tokens: int,
    call_rows: int | None = None,
    calls_per_actor: int | None = None,
) -> list[str]:
    """Overrides that turn a shipped batch config into this benchmark's run (random base, no adapter).
    call_rows / calls_per_actor: compute.batch_size / calls_per_actor (None: the config's)."""
    compute = [f"compute.batch_size={call_rows}"] if call_rows else []
    compute += [f"compute.calls_per_actor={calls_per_actor}"] if calls_per_actor else []
    return [
        *compute,
        "model.source=random",
        f"model.name={model_name}",
        "adapter=null",
        "engine.merge_adapter=false",
        f"engine.device={'auto' if gpus_per_actor else 'cpu'}",
        f"engine.dtype={engine['dtype']}",
        f"engine.max_batch_size={engine['max_batch_size']}",
        f"engine.max_context={engine['max_context']}",
        f"engine.prefill_tokens={engine['prefill_tokens']}",
        f"engine.decode_attention={engine['decode_attention']}",
        f"generation.max_tokens={max_tokens}",
        f"compute.num_actors={actors}",
        f"compute.max_actors={actors}",
        f"compute.num_gpus_per_actor={gpus_per_actor}",
        "output.mode=overwrite",
    ]


def read_output(folder: Path) -> dict:
    """Rows, distinct ids, error rows and output tokens in the job's visible Parquet files."""
    table = pads.dataset(str(folder), format="parquet").to_table(columns=["id", "completion_tokens", "error"])
    return {
        "rows_written": table.num_rows,
        "distinct_ids": len(pc.unique(table["id"])),
        "error_rows": table.num_rows - table["error"].null_count,
        "output_tokens": int(pc.sum(table["completion_tokens"]).as_py() or 0),
    }


def run_batch_job(
    config: Path,
    questions: Path,
    output: Path,
    overrides: list[str],
    ray_address: str | None,
    log_path: Path,
    timeout_s: float,
    job_env: dict[str, str] | None = None,
) -> dict:
    """One `python -m batch` run; job_env: environment variables for the job's Ray workers (its
    runtime_env, handed over as `ray job submit` does)."""
    command = [
        sys.executable,
        "-m",
        "batch",
        "--config",
        str(config),
        "--input",
        str(questions),
        "--output",
        str(output),
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["RAY_DEDUP_LOGS"] = "0"  # every actor's timing lines, even where two read alike
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # join this benchmark's Ray instance, never another on the machine
    if job_env:
        # The job's ray.init() merges this JobConfig's runtime_env in (ray.job_config.JobConfig.from_json).
        workers = {"PYTHONPATH": env["PYTHONPATH"], "TOKENIZERS_PARALLELISM": "false", **job_env}
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"env_vars": workers}})
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    process_wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"python -m batch exited with {proc.returncode}; log {log_path}:\n{text[-3000:]}")
    summary = text[text.rfind("batch summary") :] if "batch summary" in text else ""
    job_wall = re.search(r"wall time:\s+([0-9.]+) s", summary)
    return {
        "command": f"python -m batch --config {os.path.relpath(config, ROOT)} " + " ".join(overrides),
        "process_wall_s": process_wall,
        "job_wall_s": float(job_wall.group(1)) if job_wall else process_wall,
        "summary": summary.strip().splitlines()[1:],
        "time_split": time_split(text),
        **engine_calls(text),
        **read_output(output),
    }


def time_split(log_text: str) -> dict | None:
    """The job's time split (batch/timing.py's "batch timing:" JSON line), None when the log has none."""
    lines = re.findall(r"batch timing: (\{.*\})", log_text)
    return json.loads(lines[-1]) if lines else None


def split_line(split: dict | None) -> str:
    """The split in one line for the benchmark's progress log."""
    if not split:
        return "no time split in the log"
    parts = ("ray_start", "plan", "actors_ready", "waiting", "answering", "writing")
    return (
        ", ".join(f"{p.replace('_', ' ')} {split[p + '_s']:.1f} s" for p in parts)
        + f"; engine: actor start {split['actor_start_s']:.1f} s, load {split['load_s']:.1f} s, warm-up "
        f"{split['warm_up_s']:.1f} s, compile cache {split['compile_cache']}"
    )


def job_runs(
    config: Path,
    questions: Path,
    work: Path,
    name: str,
    overrides: list[str],
    ray_address: str | None,
    timeout_s: float,
    compile_cache: Path | None = None,
) -> list[dict]:
    """One run of the job, or with compile_cache two on that folder ("first", then "warm"), each with
    fresh Inductor and Triton caches for its workers; every run's dict says which it was ("label")."""
    if compile_cache is None:
        log_path = work / f"batch-{name}.log"
        run = run_batch_job(config, questions, work / f"answers-{name}", overrides, ray_address, log_path, timeout_s)
        return [run | {"label": None}]
    compile_cache, runs = compile_cache.resolve(), []  # the job runs in the project root
    for label in ("first", "warm"):
        local = work / f"local-caches-{name}-{label}"
        job_env = {"TORCHINDUCTOR_CACHE_DIR": str(local / "inductor"), "TRITON_CACHE_DIR": str(local / "triton")}
        run = run_batch_job(
            config,
            questions,
            work / f"answers-{name}-{label}",
            [*overrides, f"engine.compile_cache={compile_cache}"],
            ray_address,
            work / f"batch-{name}-{label}.log",
            timeout_s,
            job_env,
        )
        runs.append(run | {"label": f"compile cache {label}"})
    return runs


def engine_calls(log_text: str) -> dict:
    """The actors' own timing lines (batch/pipeline.py's Answerer): the engines' start-up, and output
    tokens per second of answering time, start-up excluded. An actor's calls may overlap
    (compute.calls_per_actor), so its answering time is the union of its calls' spans; summed over
    the actors (one GPU each), tokens over that time is the rate of one GPU while it answers."""
    spans: dict[str, list[Work]] = defaultdict(list)
    tokens = 0
    for pid, n, start, end in re.findall(
        r"pid=(\d+)\).*?answerer: \d+ rows, (\d+) tokens in [0-9.]+ s, from ([0-9.]+) to ([0-9.]+)", log_text
    ):
        tokens += int(n)
        spans[pid].append(Work("call", float(start), float(end), float(end) - float(start)))
    ready = [float(s) for s in re.findall(r"answerer: engine ready in ([0-9.]+) s", log_text)]
    seconds = sum(merged_length(calls) for calls in spans.values())
    return {
        "engine_calls": sum(len(calls) for calls in spans.values()),
        "engine_ready_s": ready,
        "engine_tok_s_per_gpu": tokens / seconds if seconds else None,
        "engine_steps": engine_steps(log_text),
    }


STATS_LINE = re.compile(
    r"pid=(?P<pid>\d+)\).*?answerer: engine since ready: (?P<steps>\d+) steps, [0-9.]+ ms/step, "
    r"(?P<rows_per_step>[0-9.]+) rows/step, context (?P<context_cols>[0-9.]+) cols for longest (?P<longest>[0-9.]+), "
    r"busy (?P<busy_s>[0-9.]+) s, launch (?P<launch_s>[0-9.]+) s, GPU wait (?P<gpu_wait_s>[0-9.]+) s, "
    r"text (?P<text_s>[0-9.]+) s, prefill (?P<prefill_s>[0-9.]+) s \((?P<prefill_calls>\d+) calls, "
    r"(?P<prefill_prompts>\d+) prompts, (?P<prefill_tokens>\d+) tokens\), graphs (?P<graphs>\d+) \((?P<capture_s>[0-9.]+) s\)"
)
SECONDS = ("busy_s", "launch_s", "gpu_wait_s", "text_s", "prefill_s", "capture_s")
COUNTS = ("steps", "prefill_calls", "prefill_prompts", "prefill_tokens", "graphs")
MEANS = {"rows_per_step": "rows", "context_cols": "context_columns", "longest": "longest"}  # line -> counter


def _counters(match: re.Match) -> dict[str, float]:
    """One "engine since ready" line back as the engine's counters (per-step means times steps)."""
    line = match.groupdict()
    counters: dict[str, float] = {k: int(line[k]) for k in COUNTS}
    counters |= {counter: float(line[mean]) * counters["steps"] for mean, counter in MEANS.items()}
    return counters | {k: float(line[k]) for k in SECONDS}


def engine_steps(log_text: str) -> dict | None:
    """The engines' step-loop figures (the Answerer's "engine since ready" lines) over all actors:
    mistral_qa.engine.stats.summary of their summed counters, and how many actors.

    Each line holds its actor's totals since its engine was ready (calls overlap, so per-call windows
    would count steps twice): an actor's line with the most steps is its whole run. None when the log
    has no such line."""
    last: dict[str, dict[str, float]] = {}
    for match in STATS_LINE.finditer(log_text):
        counters, pid = _counters(match), match["pid"]
        if pid not in last or counters["steps"] >= last[pid]["steps"]:
            last[pid] = counters
    if not last:
        return None
    actors = list(last.values())
    return {"actors": len(actors), **summary({k: sum(a[k] for a in actors) for k in actors[0]})}
