"""A closed-loop HTTP load generator for the OpenAI-style streaming endpoint (asyncio + aiohttp,
which Ray Serve itself depends on): C clients, each sending its next request as soon as its last one
has finished, until N requests have been sent. With a ramp, client k of C waits k * ramp_s / C before
its first request, so arrivals are spread instead of coming as one wave. Time to first token is
measured here, on the client, from the moment each request is sent."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class StreamResult:
    index: int
    status: int = 0
    text: str = ""
    completion_tokens: int | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None  # until the first chunk that carries answer text
    latency_s: float = 0.0
    error: str | None = None
    chunks: int = 0
    client: int = 0  # which of the closed loop's clients sent it
    sent_s: float = 0.0  # when it was sent, seconds after the load's first request

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.completion_tokens is not None


@dataclass
class LoadResult:
    results: list[StreamResult]
    wall_s: float  # from the first request sent to the last one answered
    concurrency: int
    extra: dict = field(default_factory=dict)  # ramp_s: the spread of the clients' first requests


def _apply_chunk(result: StreamResult, payload: dict, start: float) -> None:
    if "error" in payload:
        result.error = json.dumps(payload["error"])[:300]
        return
    for choice in payload.get("choices") or []:
        piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        if piece and result.ttft_s is None:
            result.ttft_s = time.perf_counter() - start
        result.text += piece
        result.finish_reason = choice.get("finish_reason") or result.finish_reason
    if payload.get("usage"):
        result.completion_tokens = payload["usage"]["completion_tokens"]


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict, index: int) -> StreamResult:
    """POST one streamed request and read its server-sent events to the end ([DONE])."""
    result = StreamResult(index)
    start = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:300]
                return result
            async for raw in response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                result.chunks += 1
                _apply_chunk(result, json.loads(data), start)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"[:300]
    finally:
        result.latency_s = time.perf_counter() - start
    return result


async def _closed_loop(url: str, bodies: list[dict], concurrency: int, timeout_s: float, ramp_s: float) -> LoadResult:
    next_index = iter(range(len(bodies)))
    results: list[StreamResult] = []
    clients = min(concurrency, len(bodies))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client(k: int) -> None:
            await asyncio.sleep(k * ramp_s / clients)  # client 0 starts at once: the wall time starts with it
            for i in next_index:  # a shared iterator: each index goes to exactly one client
                sent = time.perf_counter() - start
                result = await stream_one(session, url, bodies[i], i)
                result.client, result.sent_s = k, sent
                results.append(result)

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
    return LoadResult(sorted(results, key=lambda r: r.index), wall, concurrency, {"ramp_s": ramp_s})


def closed_loop(
    url: str, bodies: list[dict], concurrency: int, timeout_s: float = 900, ramp_s: float = 0.0
) -> LoadResult:
    """Send every body (in order of index) from `concurrency` clients; blocks until all are answered.
    ramp_s > 0 spreads the clients' first requests evenly over that many seconds (0: all at once)."""
    return asyncio.run(_closed_loop(url, bodies, concurrency, timeout_s, ramp_s))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(load: LoadResult) -> dict:
    ok = [r for r in load.results if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    inter_token = [
        (r.latency_s - r.ttft_s) / (r.completion_tokens - 1) * 1000
        for r in ok
        if r.ttft_s is not None and r.completion_tokens > 1
    ]
    return {
        "requests": len(load.results),
        "ok": len(ok),
        "failed": len(load.results) - len(ok),
        "concurrency": load.concurrency,
        "ramp_s": load.extra.get("ramp_s", 0.0),
        "output_tokens": tokens,
        "wall_s": load.wall_s,
        "tok_s": tokens / load.wall_s if load.wall_s else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "latency_p50_s": percentile([r.latency_s for r in ok], 50),
        "inter_token_p50_ms": percentile(inter_token, 50),
        "first_errors": [r.error for r in load.results if not r.ok][:3],
    }
