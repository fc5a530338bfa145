"""`python -m serve.benchmark` on CPU with the tiny Mistral and tiny sizes: every phase runs for real
(the Engine in process, random LoRA adapters, Ray Serve over HTTP with streaming clients, the Ray
Data batch job as its own process, plain transformers), and its JSON and markdown hold every phase's
figures with the serve phase's answers equal to each prompt's answer alone. Plus the pieces that
decide pass/fail (prompt sizing, the question file, percentiles, the answer check) on their own."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serve.bench.loadgen import LoadResult, StreamResult, percentile
from serve.bench.serve_run import check_against_reference
from serve.bench.workload import bench_prompts, token_counter, write_alpaca_questions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    from mistral_qa.config import ModelConfig
    from mistral_qa.model import load_tokenizer

    return load_tokenizer(ModelConfig(source="random", name="tiny-mistral"))


def test_prompts_are_distinct_and_just_under_the_target(tokenizer):
    count = token_counter(tokenizer)
    prompts = bench_prompts(count, 16, 256)
    assert len({p.prompt for p in prompts}) == 16
    assert all(240 <= count(p.prompt) <= 256 for p in prompts)
    assert prompts[3].prompt.endswith("### Response:\n") and prompts[3].question in prompts[3].prompt


def test_question_file_repeats_instructions_with_variants(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Task {i}.", "input": "", "output": "x"} for i in range(3)]))
    write_alpaca_questions(alpaca, 7, tmp_path / "q.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [
        "Task 0.", "Task 1.", "Task 2.",
        "Task 0. (variant 2)", "Task 1. (variant 2)", "Task 2. (variant 2)", "Task 0. (variant 3)",
    ]  # fmt: skip
    assert len({r["id"] for r in rows}) == 7


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_answer_check_flags_a_different_answer_and_a_failed_request():
    def answer(i: int, text: str, tokens: int | None = 5, status: int = 200) -> StreamResult:
        return StreamResult(i, status=status, text=text, completion_tokens=tokens, finish_reason="length")

    reference = [answer(0, "alpha"), answer(1, "beta")]
    good = LoadResult([answer(0, "alpha"), answer(1, "beta"), answer(2, "alpha"), answer(3, "beta")], 1.0, 2)
    assert check_against_reference(good, reference, 2)["passed"]
    bad = LoadResult([answer(0, "alpha"), answer(1, "betA"), answer(2, "alpha", status=429, tokens=None)], 1.0, 2)
    check = check_against_reference(bad, reference, 2)
    assert not check["passed"] and check["matching"] == 1
    assert [m["request"] for m in check["first_mismatches"]] == [1, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_RUN = [
    "--model-name", "tiny-mistral", "--device", "cpu", "--prompt-tokens", "64", "--max-tokens", "16",
    "--distinct-prompts", "4", "--single-repeats", "1", "--hf-new-tokens", "8", "--hf-batch", "4",
    "--hf-cb-requests", "4", "--concurrency", "4", "--requests", "8", "--adapter-batch", "4",
    "--batch-questions", "40", "--batch-max-tokens", "8", "--batch-gpus", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory) -> tuple[dict, str, str]:
    """(JSON report, markdown, stdout) of one whole tiny run in its own process."""
    tmp = tmp_path_factory.mktemp("bench")
    alpaca = tmp / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"How does habit {i} affect sleep?"} for i in range(15)]))
    args = [*TINY_RUN, "--alpaca", str(alpaca), "--port", str(free_port()), "--work-dir", str(tmp / "work"),
            "--json-out", str(tmp / "out" / "bench.json"), "--md-out", str(tmp / "out" / "bench.md")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the test session's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "serve.benchmark", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((tmp / "out" / "bench.json").read_text()), (tmp / "out" / "bench.md").read_text(), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and math.isfinite(x)


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_benchmark_reports_every_phase(tiny_benchmark):
    report, markdown, stdout = tiny_benchmark
    phases = report["phases"]
    assert set(phases) == {"hf", "engine", "serve", "adapters", "batch"}
    assert not [name for name, r in phases.items() if "error" in r]
    table_phases = {row["phase"] for row in report["table"]}
    assert table_phases == set(phases) and not [r for r in report["table"] if r["metric"] == "FAILED"]
    for name in phases:
        assert f"| {name} |" in markdown
        assert f"\n{name} " in stdout  # the printed table


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_hf_and_engine_figures(tiny_benchmark):
    hf, engine = tiny_benchmark[0]["phases"]["hf"], tiny_benchmark[0]["phases"]["engine"]
    assert positive(hf["batch1"]["decode_ms_per_token"]) and positive(hf["batch1"]["ttft_ms"])
    assert hf["batch1"]["output_tokens"] == 8 and hf["batch"]["output_tokens"] == 4 * 8
    assert positive(hf["batch"]["tok_s"])
    continuous = hf["continuous"]
    assert "skipped" not in continuous, continuous
    assert continuous["failed"] == 0 and positive(continuous["tok_s"])
    single = engine["single"]
    assert 56 <= single["prompt_tokens"] <= 64 and single["output_tokens"] >= 8
    assert positive(single["decode_ms_per_token"]) and positive(single["ttft_ms"])


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_serve_figures_and_answers_equal_their_answer_alone(tiny_benchmark):
    serve = tiny_benchmark[0]["phases"]["serve"]
    assert serve["correctness"]["passed"] and serve["correctness"]["matching"] == 8
    assert serve["ok"] == 8 and serve["failed"] == 0 and serve["concurrency"] == 4
    assert positive(serve["tok_s"]) and positive(serve["ttft_p50_ms"])
    assert serve["ttft_p99_ms"] >= serve["ttft_p50_ms"]
    assert positive(serve["single_request"]["ttft_p50_ms"])
    assert "| answers equal the prompt's answer alone | 8/8 | PASS |" in tiny_benchmark[1]


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_adapter_figures(tiny_benchmark):
    adapters = tiny_benchmark[0]["phases"]["adapters"]
    assert set(adapters["runs"]) == {"base", "a", "a+b mixed", "base rows", "a merged"}
    assert all(positive(r["tok_s"]) and r["requests"] == 4 for r in adapters["runs"].values())
    for key in ("merged_vs_base_pct", "unmerged_vs_base_pct", "mixed_vs_single_adapter_pct"):
        assert math.isfinite(adapters[key])
    checks = adapters["checks"]
    assert checks["mixed_a_rows_equal_all_a"] == checks["mixed_a_rows"] == 2  # a row's answer ignores its neighbours
    assert checks["adapter_changes_answers"] > 0  # the random adapter is really applied


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_batch_job_figures(tiny_benchmark):
    batch = tiny_benchmark[0]["phases"]["batch"]
    [run] = batch["runs"]
    assert run["actors"] == 1 and run["rows_written"] == run["distinct_ids"] == 40 and run["error_rows"] == 0
    assert run["output_tokens"] > 0 and positive(run["tok_s"]) and positive(run["job_wall_s"])
    assert "compute.num_gpus_per_actor=0" in run["command"]
