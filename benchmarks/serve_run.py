"""The real Ray Serve app (serve.app's ChatServer, as `python -m serve` deploys it) under load over
HTTP: each distinct prompt alone first (the reference answers, and single-request latency), one
warm-up wave, then a closed loop of C streaming clients twice: all starting together ("burst": the
engine sees waves of C new prompts) and with their first requests spread over a ramp ("staggered",
closer to real traffic). Every answer must equal its prompt's answer when it ran alone."""

from __future__ import annotations

from collections.abc import Callable

from serve.ready import wait_until_ready

from .loadgen import LoadResult, StreamResult, closed_loop, summarize
from .workload import BenchPrompt

APP_NAME = "mistral-qa-bench"
MODEL = "base"


def deploy(app_args: dict, port: int, concurrency: int, num_gpus: float) -> str:
    """Start Serve on `port` and deploy the app; returns its URL once /health answers."""
    from ray import serve

    from serve.app import ChatServer, EngineLoader, load_settings

    settings = load_settings(app_args)  # the same validation build_app does
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # As `python -m serve --config` does: build_app's deployment with the GPU variant's options.
    app = ChatServer.options(
        ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus},
        max_ongoing_requests=max(80, concurrency + 16),
        max_queued_requests=max(128, 2 * concurrency),
    ).bind(EngineLoader(settings.engine), settings)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, timeout_s=900)
    return url


def chat_body(prompt: BenchPrompt, max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "messages": prompt.messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def check_against_reference(load: LoadResult, reference: list[StreamResult], n_prompts: int) -> dict:
    """Every answer must be its prompt's reference answer: same text, token count and finish reason."""
    mismatches = []
    for r in load.results:
        ref = reference[r.index % n_prompts]
        same = r.ok and (r.text, r.completion_tokens, r.finish_reason) == (
            ref.text,
            ref.completion_tokens,
            ref.finish_reason,
        )
        if not same:
            mismatches.append(
                {
                    "request": r.index,
                    "prompt": r.index % n_prompts,
                    "tokens": r.completion_tokens,
                    "reference_tokens": ref.completion_tokens,
                    "error": r.error,
                }
            )
    return {
        "checked": len(load.results),
        "matching": len(load.results) - len(mismatches),
        "passed": not mismatches and len(load.results) > 0,
        "first_mismatches": mismatches[:5],
    }


def replica_stats() -> dict[str, float]:
    """The replica's engine step-loop counters (ChatServer.engine_stats, through a deployment handle)."""
    from ray import serve

    return serve.get_app_handle(APP_NAME).engine_stats.remote().result()


def timed_load(
    endpoint: str,
    bodies: list[dict],
    requests: int,
    concurrency: int,
    ramp_s: float,
    alone: LoadResult,
    engine_stats: Callable[[], dict] | None = None,
) -> dict:
    """One timed closed loop of `requests` requests: its figures, the check against the answers alone
    and, given `engine_stats` (replica_stats), the replica's engine step loop over the load (ms per
    decode step and where it went), which tells the engine's own pace from what HTTP and Serve add."""
    from mistral_qa.engine.stats import difference, summary

    before = engine_stats() if engine_stats else None
    load = closed_loop(endpoint, [bodies[i % len(bodies)] for i in range(requests)], concurrency, ramp_s=ramp_s)
    stats = summarize(load)
    stats["correctness"] = check_against_reference(load, alone.results, len(bodies))
    if engine_stats:
        stats["engine"] = {"actors": 1, **summary(difference(engine_stats(), before))}
    return stats


def _log_run(log, name: str, stats: dict) -> None:
    c, ttft = stats["correctness"], stats["ttft_p50_ms"]
    ttft_text = "n/a" if ttft is None else f"{ttft:.1f} ms"
    answers = f"answers {c['matching']}/{c['checked']} equal to alone"
    log(f"serve {name}: {stats['tok_s']:.1f} tok/s, TTFT p50 {ttft_text}, {answers}")


def run_serve_load(
    url: str,
    prompts: list[BenchPrompt],
    requests: int,
    concurrency: int,
    max_tokens: int,
    warmup: int,
    log,
    ramp_s: float = 0.0,
    engine_stats: Callable[[], dict] | None = None,
) -> dict:
    """The burst run's figures at the top level (as before the staggered run existed), the staggered
    run's under "staggered" (absent when ramp_s is 0), and the single requests' under "single_request"."""
    endpoint = f"{url}/v1/chat/completions"
    bodies = [chat_body(p, max_tokens) for p in prompts]
    alone = closed_loop(endpoint, bodies, concurrency=1)
    if any(not r.ok for r in alone.results):
        raise RuntimeError(f"reference requests failed: {[r.error for r in alone.results if not r.ok][:3]}")
    single = summarize(alone)
    log(
        f"serve reference: {len(prompts)} prompts alone, TTFT p50 {single['ttft_p50_ms']:.1f} ms, "
        f"{single['inter_token_p50_ms']} ms/token"
    )
    if warmup:  # the first full batch captures the engine's larger CUDA graphs
        closed_loop(endpoint, [bodies[i % len(bodies)] for i in range(warmup)], concurrency)
        log(f"serve warm-up: {warmup} requests")
    stats = timed_load(endpoint, bodies, requests, concurrency, 0.0, alone, engine_stats)
    _log_run(log, "burst (all clients start together)", stats)
    if ramp_s > 0:
        stats["staggered"] = timed_load(endpoint, bodies, requests, concurrency, ramp_s, alone, engine_stats)
        _log_run(log, f"staggered (starts spread over {ramp_s:g} s)", stats["staggered"])
    stats["single_request"] = {k: single[k] for k in ("ttft_p50_ms", "inter_token_p50_ms", "latency_p50_s")}
    return stats


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
