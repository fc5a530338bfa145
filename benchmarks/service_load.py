"""The Serve replica's own code under load, in process: C concurrent streaming chat requests through
OpenAIService (admission, tokenising, the engine's stream with stream_interval_ms, the SSE chunks),
with no Ray Serve, proxy or HTTP in between, timed as the HTTP load is (benchmarks/loadgen.py).
Beside the serve phase's figures on the same card, this tells what Ray Serve's transport adds to the
replica's own pace: the same closed loop of clients, the same prompts, the same answers checked
against each prompt alone."""

from __future__ import annotations

import asyncio
import json
import time

from .loadgen import LoadResult, StreamResult, _apply_chunk, summarize
from .serve_run import chat_body, check_against_reference
from .workload import BenchPrompt


async def _stream_one(service, body: dict, index: int) -> StreamResult:
    """One streamed request through the service, its SSE chunks read as a client reads them."""
    from serve.errors import OpenAIError
    from serve.protocol import ChatCompletionRequest

    result = StreamResult(index)
    start = time.perf_counter()
    try:
        response = await service.chat(ChatCompletionRequest.model_validate(body))
        result.status = 200
        async for item in response.body_iterator:
            data = item[len("data:") :].strip()
            if data == "[DONE]":
                break
            result.chunks += 1
            _apply_chunk(result, json.loads(data), start)
    except OpenAIError as err:
        result.status, result.error = err.status, str(err)[:300]
    finally:
        result.latency_s = time.perf_counter() - start
    return result


async def _closed_loop(service, bodies: list[dict], concurrency: int) -> LoadResult:
    next_index = iter(range(len(bodies)))
    results: list[StreamResult] = []

    async def client() -> None:
        for i in next_index:  # shared: each index goes to exactly one client
            results.append(await _stream_one(service, bodies[i], i))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(bodies)))))
    wall = time.perf_counter() - start
    return LoadResult(sorted(results, key=lambda r: r.index), wall, concurrency, {"ramp_s": 0.0})


def run_service_load(
    engine_cfg, app_args: dict, prompts: list[BenchPrompt], requests: int, concurrency: int, max_tokens: int, log
) -> dict:
    """Each prompt alone first (the reference answers), one warm-up wave, then `requests` requests from
    `concurrency` clients starting together: the HTTP load's "burst", without HTTP."""
    from mistral_qa.engine import Engine
    from mistral_qa.engine.stats import summary
    from serve.app import load_settings
    from serve.service import OpenAIService

    settings = load_settings(app_args)
    engine = Engine(engine_cfg)
    try:
        service = OpenAIService(engine, settings)
        bodies = [chat_body(p, max_tokens) for p in prompts]

        async def run() -> dict:
            alone = await _closed_loop(service, bodies, 1)
            await _closed_loop(service, [bodies[i % len(bodies)] for i in range(concurrency)], concurrency)
            before = engine.stats()
            load = await _closed_loop(service, [bodies[i % len(bodies)] for i in range(requests)], concurrency)
            stats = summarize(load)
            stats["correctness"] = check_against_reference(load, alone.results, len(bodies))
            stats["engine"] = {"actors": 1, **summary(engine.stats(since=before))}
            stats["single_request"] = {k: summarize(alone)[k] for k in ("ttft_p50_ms", "inter_token_p50_ms")}
            return stats

        stats = asyncio.run(run())
    finally:
        engine.close()
    log(f"service in process: {stats['tok_s']:.1f} tok/s, TTFT p50 {stats['ttft_p50_ms']:.1f} ms")
    return stats
