"""`python -m benchmarks.serving` on CPU with the tiny Mistral and tiny sizes: every phase runs for real
(the Engine in process, random LoRA adapters, Ray Serve over HTTP with streaming clients, the Ray
Data batch job as its own process, plain transformers), and its JSON and markdown hold every phase's
figures with the serve phase's answers equal to each prompt's answer alone, for clients starting
together and for starts spread over a ramp. Plus the pieces that decide pass/fail (prompt sizing, the
question file, percentiles, the answer check) on their own, and the load generator's ramp and the
serve phase's two timed runs against a small real streaming HTTP server (aiohttp, in a thread)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from benchmarks.loadgen import LoadResult, StreamResult, closed_loop, percentile
from benchmarks.serve_run import check_against_reference, run_serve_load
from benchmarks.serving_report import render, table_rows
from benchmarks.workload import QUESTIONS, BenchPrompt, bench_prompts, token_counter, write_alpaca_questions

ROOT = Path(__file__).resolve().parents[2]


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


STEP_S = 0.1  # the streaming server's time per token
ARRIVALS = web.AppKey("arrivals", list)  # when each request reached the server (time.perf_counter)


async def stream_answer(request: web.Request) -> web.StreamResponse:
    """An OpenAI-style streamed chat answer: max_tokens words of the question, STEP_S apart, then usage."""
    request.app[ARRIVALS].append(time.perf_counter())
    body = await request.json()
    words, n = body["messages"][-1]["content"].split(), body["max_tokens"]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(n):
        await asyncio.sleep(STEP_S)
        choice = {"delta": {"content": words[i % len(words)] + " "}, "finish_reason": "length" if i == n - 1 else None}
        await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
    await response.write(f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.fixture(scope="module")
def stream_server():
    """(URL, server-side arrival times) of a real HTTP server on its own event loop in a thread."""
    app = web.Application()
    app[ARRIVALS] = []
    app.router.add_post("/v1/chat/completions", stream_answer)
    runner, port, loop, ready = web.AppRunner(app), free_port(), asyncio.new_event_loop(), threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{port}", app[ARRIVALS]
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def chat(i: int, tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": QUESTIONS[i]}], "max_tokens": tokens, "stream": True}


def test_ramp_spreads_the_clients_first_requests(stream_server):
    url, arrivals = stream_server
    # 1.4 s per request, longer than the ramp: each client's first request arrives before any second one.
    # Ramp steps of 0.3 s leave room for a busy 2-core machine's scheduling delays.
    bodies = [chat(i, 14) for i in range(8)]
    arrivals.clear()
    burst = closed_loop(f"{url}/v1/chat/completions", bodies, concurrency=4)
    first = sorted(arrivals)[:4]
    assert burst.extra == {"ramp_s": 0.0} and first[-1] - first[0] < 0.15  # one wave

    arrivals.clear()
    load = closed_loop(f"{url}/v1/chat/completions", bodies, concurrency=4, ramp_s=1.2)
    assert load.extra == {"ramp_s": 1.2} and all(r.ok and r.completion_tokens == 14 for r in load.results)
    first = sorted(arrivals)[:4]
    for k in range(4):  # client k starts k * 1.2 / 4 s after client 0, as the server saw it
        assert k * 0.3 - 0.05 <= first[k] - first[0] <= k * 0.3 + 0.25, first
    starts = {k: min(r.sent_s for r in load.results if r.client == k) for k in range(4)}
    assert all(k * 0.3 <= starts[k] <= k * 0.3 + 0.25 for k in range(4)), starts
    assert load.wall_s >= 0.9 + 2 * 14 * STEP_S  # the last client starts at 0.9 s and runs 2 requests
    assert all(r.ttft_s < STEP_S + 0.3 for r in load.results)  # from each request's send, not the load's start


def test_serve_load_times_a_burst_and_a_staggered_run(stream_server):
    url, _ = stream_server
    prompts = [BenchPrompt(q, "Some context.") for q in QUESTIONS[:4]]
    stats = run_serve_load(url, prompts, 8, 4, 3, warmup=4, log=lambda _: None, ramp_s=0.4)
    staggered = stats.pop("staggered")
    for run, ramp in ((stats, 0.0), (staggered, 0.4)):
        assert run["ramp_s"] == ramp and run["ok"] == 8 and run["output_tokens"] == 8 * 3
        assert run["correctness"]["passed"] and run["correctness"]["matching"] == 8
        assert run["tok_s"] == pytest.approx(run["output_tokens"] / run["wall_s"])
    # The wall time runs from the first request sent to the last answered, the ramp included: the last
    # client starts 0.3 s late and, as a closed loop keeps 4 in flight, the 8 requests take 2 rounds.
    assert staggered["wall_s"] >= 0.3 + 2 * 3 * STEP_S and stats["wall_s"] < staggered["wall_s"]
    stats["staggered"] = staggered
    table = render(table_rows({"serve": stats}), markdown=True)
    assert "| HTTP output throughput (4 concurrent streams, all starting together) |" in table
    assert "| HTTP output throughput (4 concurrent streams, starts spread over 0.4 s) |" in table
    assert "| answers equal the prompt's answer alone | 8/8 | PASS |" in table
    assert "| answers equal the prompt's answer alone, starts spread over 0.4 s | 8/8 | PASS |" in table
    assert "| HTTP TTFT p50, starts spread over 0.4 s |" in table


def test_no_staggered_run_without_a_ramp(stream_server):
    prompts = [BenchPrompt(q, "Some context.") for q in QUESTIONS[:2]]
    stats = run_serve_load(stream_server[0], prompts, 2, 2, 1, warmup=0, log=lambda _: None, ramp_s=0.0)
    assert "staggered" not in stats and stats["correctness"]["passed"]
    assert "spread" not in render(table_rows({"serve": stats}), markdown=False)


TINY_RUN = [
    "--model-name", "tiny-mistral", "--device", "cpu", "--prompt-tokens", "64", "--max-tokens", "16",
    "--distinct-prompts", "4", "--single-repeats", "1", "--hf-new-tokens", "8", "--hf-batch", "4",
    "--hf-cb-requests", "4", "--concurrency", "4", "--requests", "8", "--adapter-batch", "4",
    "--adapter-repeats", "2",
    "--batch-questions", "40", "--batch-max-tokens", "8", "--batch-gpus", "0", "--batch-max-batch-size", "4",
    "--batch-call-rows", "4",
    "--profile-steps", "3",
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
        [sys.executable, "-m", "benchmarks.serving", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((tmp / "out" / "bench.json").read_text()), (tmp / "out" / "bench.md").read_text(), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and math.isfinite(x)


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_benchmark_reports_every_phase(tiny_benchmark):
    report, markdown, stdout = tiny_benchmark
    phases = report["phases"]
    assert set(phases) == {"hf", "engine", "service", "serve", "adapters", "batch"}
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
    full = engine["full_batch"]  # 64 requests (the default max_batch_size) at once, in process
    assert full["requests"] == 64 and full["output_tokens"] >= 64 * 8 and positive(full["tok_s"])
    assert full["engine"]["prefill_prompts"] == 64 and 1 < full["engine"]["rows_per_step"] <= 64
    assert "| engine | 64 requests at once, in process: engine step loop |" in tiny_benchmark[1]
    # The profile: a decode step alone at 1 and 64 sequences (the default max_batch_size), and a prefill pack.
    names = list(engine["profile"])
    assert len(names) == 3 and names[0].startswith("decode step, 1 sequence") and "64 sequence" in names[1]
    assert names[2].startswith("prefill pack, ")
    for summary in engine["profile"].values():
        assert summary["steps"] == 3 and positive(summary["wall_ms_per_step"]) and summary["top_kernels"]
    markdown = tiny_benchmark[1]
    assert "| engine | profile: decode step, 64 sequence(s)" in markdown


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_serve_figures_and_answers_equal_their_answer_alone(tiny_benchmark):
    serve = tiny_benchmark[0]["phases"]["serve"]
    assert serve["correctness"]["passed"] and serve["correctness"]["matching"] == 8
    assert serve["ok"] == 8 and serve["failed"] == 0 and serve["concurrency"] == 4
    assert positive(serve["tok_s"]) and positive(serve["ttft_p50_ms"])
    assert serve["ttft_p99_ms"] >= serve["ttft_p50_ms"]
    assert positive(serve["single_request"]["ttft_p50_ms"])
    assert "| answers equal the prompt's answer alone | 8/8 | PASS |" in tiny_benchmark[1]
    # The replica's own step loop over the burst, read through a deployment handle: it decoded every
    # answer's tokens after the first (a prefill gives the first) and prefilled the load's 8 prompts.
    steps = serve["engine"]
    assert steps["steps"] >= 15 and steps["prefill_prompts"] == 8 and positive(steps["ms_per_step"])
    assert "| serve | Serve replica: engine step loop |" in tiny_benchmark[1]


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_service_in_process_figures(tiny_benchmark):
    service = tiny_benchmark[0]["phases"]["service"]
    assert service["correctness"]["passed"] and service["correctness"]["matching"] == 8
    assert service["ok"] == 8 and service["output_tokens"] == 8 * 16 and positive(service["tok_s"])
    assert service["engine"]["prefill_prompts"] == 8 and service["engine"]["steps"] >= 15
    assert "| service | 4 streams in process, all starting together: output tok/s |" in tiny_benchmark[1]


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_serve_staggered_run(tiny_benchmark):
    serve = tiny_benchmark[0]["phases"]["serve"]
    assert serve["ramp_s"] == 0.0 and serve["staggered"]["ramp_s"] == 2.0  # the default --serve-ramp-s
    staggered = serve["staggered"]
    assert staggered["correctness"]["passed"] and staggered["correctness"]["matching"] == 8
    assert staggered["ok"] == 8 and staggered["failed"] == 0 and staggered["concurrency"] == 4
    assert positive(staggered["tok_s"]) and positive(staggered["ttft_p50_ms"])
    assert staggered["wall_s"] >= 2.0 * 3 / 4  # the last client starts 1.5 s after the first
    markdown = tiny_benchmark[1]
    assert "| HTTP output throughput (4 concurrent streams, starts spread over 2 s) |" in markdown
    assert "| answers equal the prompt's answer alone, starts spread over 2 s | 8/8 | PASS |" in markdown


@pytest.mark.slow  # one whole tiny run of every phase (~1.5-3 min)
def test_adapter_figures(tiny_benchmark):
    adapters = tiny_benchmark[0]["phases"]["adapters"]
    assert set(adapters["runs"]) == {"base", "a", "a+b mixed", "base rows", "a merged"}
    assert all(positive(r["tok_s"]) and r["requests"] == 4 for r in adapters["runs"].values())
    for r in adapters["runs"].values():  # the figure is the median of the timed runs
        assert len(r["tok_s_runs"]) == 2 and r["tok_s"] == statistics.median(r["tok_s_runs"])
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
    # The actor's own timing lines: 40 questions in calls of max_batch_size = 4 rows.
    assert "compute.batch_size=4" in run["command"]
    assert run["engine_calls"] == 10 and len(run["engine_ready_s"]) == 1
    assert run["engine_tok_s_per_gpu"] > run["tok_s"]  # start-up excluded
    steps = run["engine_steps"]
    assert steps["actors"] == 1 and steps["steps"] > 0 and 1 <= steps["rows_per_step"] <= 4
    assert steps["prefill_prompts"] == 40 and "| batch | 1 actor(s) x 0 GPU: engine step loop |" in tiny_benchmark[1]


def test_engine_rate_counts_an_actors_overlapping_calls_once():
    """Calls of one actor overlap (compute.calls_per_actor): its answering time is their union."""
    from benchmarks.batch_job import engine_calls

    prefix = "\x1b[36m(MapWorker(MapBatches(Answerer)) pid={})\x1b[0m "
    log = "\n".join(
        [
            prefix.format(11) + "answerer: engine ready in 8.1 s",
            prefix.format(11) + "answerer: 4 rows, 300 tokens in 3.00 s, from 100.000 to 103.000",
            prefix.format(11) + "answerer: 4 rows, 300 tokens in 3.00 s, from 101.000 to 104.000",  # overlaps
            prefix.format(22) + "answerer: engine ready in 7.9 s",
            prefix.format(22) + "answerer: 4 rows, 400 tokens in 4.00 s, from 100.000 to 104.000",
        ]
    )
    calls = engine_calls(log)
    assert calls["engine_calls"] == 3 and calls["engine_ready_s"] == [8.1, 7.9]
    assert calls["engine_tok_s_per_gpu"] == pytest.approx(1000 / (4 + 4))


def test_engine_step_counters_take_each_actors_last_cumulative_line():
    """The "engine since ready" lines are cumulative per actor: the one with the most steps is the
    actor's total (threads may log out of order); the actors' totals add up, means weighted by steps."""
    from benchmarks.batch_job import engine_calls

    prefix = "\x1b[36m(MapWorker(MapBatches(Answerer)) pid={})\x1b[0m "
    line = (
        "answerer: engine since ready: {} steps, 1.0 ms/step, {} rows/step, context {} cols for longest {}, "
        "busy {} s, launch 1.00 s, GPU wait {} s, text 0.50 s, prefill 2.00 s (3 calls, {} prompts, 900 tokens), "
        "graphs {} (0.25 s)"
    )
    log = "\n".join(
        [
            prefix.format(11) + "answerer: 4 rows, 300 tokens in 3.00 s, from 100.000 to 103.000",
            prefix.format(11) + line.format(100, 4.0, 128, 90, 5.00, 1.00, 4, 1),
            prefix.format(11) + line.format(300, 3.0, 256, 150, 10.00, 6.00, 8, 3),
            prefix.format(11) + line.format(200, 3.5, 256, 120, 8.00, 4.00, 8, 2),  # logged late by the other thread
            prefix.format(22) + line.format(100, 2.0, 128, 70, 6.00, 3.50, 4, 1),
        ]
    )
    steps = engine_calls(log)["engine_steps"]
    assert steps["actors"] == 2 and steps["steps"] == 400
    assert steps["rows_per_step"] == pytest.approx((300 * 3 + 100 * 2) / 400)
    assert steps["context_cols"] == pytest.approx((300 * 256 + 100 * 128) / 400)
    assert steps["longest"] == pytest.approx((300 * 150 + 100 * 70) / 400)
    assert steps["ms_per_step"] == pytest.approx(16_000 / 400)
    assert steps["gpu_wait_s"] == pytest.approx(9.5) and steps["launch_s"] == pytest.approx(2.0)
    assert steps["other_s"] == pytest.approx(16 - 9.5 - 2 - 1 - 4)
    assert (steps["prefill_calls"], steps["prefill_prompts"], steps["prefill_tokens"]) == (6, 12, 1800)
    assert steps["graphs"] == 4 and steps["capture_s"] == pytest.approx(0.5)  # each actor's last line
    report = {"questions": 4, "runs": [{"actors": 2, "gpus_per_actor": 1, "tok_s": 1.0, "output_tokens": 1,
              "job_wall_s": 1.0, "process_wall_s": 2.0, "rows_written": 4, "error_rows": 0, "distinct_ids": 4,
              "engine_steps": steps}]}  # fmt: skip
    table = render(table_rows({"batch": report}), markdown=True)
    assert "| batch | 2 actor(s) x 1 GPU: engine step loop | 40.00 | ms/step | 400 steps of 2 actors," in table
    assert engine_calls(prefix.format(11) + "answerer: engine ready in 8.1 s")["engine_steps"] is None
