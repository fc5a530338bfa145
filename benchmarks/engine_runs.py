"""The Engine in process, through its public API only: a timed set of requests (each with its own
adapter), single-stream latency, batch throughput."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

from mistral_qa.engine import Completion, Engine, SamplingParams


@dataclass
class Timed:
    """One finished request and its clock readings (time.monotonic, the engine's own clock)."""

    completion: Completion
    submitted: float
    first_token: float
    done: float

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.submitted

    @property
    def decode_ms_per_token(self) -> float | None:
        """From the first token to the last: decode only."""
        n = self.completion.completion_tokens
        return (self.done - self.first_token) / (n - 1) * 1000 if n > 1 else None


def run_requests(engine: Engine, items: list[tuple[str, str | None]], params: SamplingParams) -> list[Timed]:
    """Submit every (prompt, adapter) at once, wait for all; results in the order of `items`."""
    requests = [engine.make_request(prompt, params, adapter) for prompt, adapter in items]
    done_at: list[float | None] = [None] * len(requests)
    results: list[Completion | BaseException | None] = [None] * len(requests)
    left = [len(requests)]
    all_done = threading.Event()
    lock = threading.Lock()

    def on_delta(i: int):
        def callback(delta) -> None:
            if not delta.finished:
                return
            done_at[i] = time.monotonic()
            results[i] = delta.completion if delta.error is None else delta.error
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

        return callback

    submitted = []
    for i, request in enumerate(requests):
        request.on_delta = on_delta(i)
        submitted.append(time.monotonic())
        engine.submit(request)
    all_done.wait()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(requests)} requests failed: {errors[0]!r}") from errors[0]
    return [
        Timed(c, s, r.first_token_at if r.first_token_at is not None else d, d)
        for c, s, r, d in zip(results, submitted, requests, done_at, strict=True)
    ]


def throughput(timed: list[Timed]) -> dict:
    """Output tokens over the wall time from the first submit to the last answer."""
    wall = max(t.done for t in timed) - min(t.submitted for t in timed)
    tokens = sum(t.completion.completion_tokens for t in timed)
    return {"requests": len(timed), "output_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def single_stream(engine: Engine, prompt: str, max_tokens: int, repeats: int) -> dict:
    """One request at a time, after one warm-up run (CUDA graphs are captured on first use)."""
    params = SamplingParams(max_tokens=max_tokens)
    run_requests(engine, [(prompt, None)], params)
    runs = [run_requests(engine, [(prompt, None)], params)[0] for _ in range(max(repeats, 1))]
    per_token = [r.decode_ms_per_token for r in runs if r.decode_ms_per_token is not None]
    return {
        "prompt_tokens": runs[0].completion.prompt_tokens,
        "output_tokens": runs[0].completion.completion_tokens,
        "repeats": len(runs),
        "decode_ms_per_token": statistics.median(per_token) if per_token else None,
        "ttft_ms": statistics.median(r.ttft_s * 1000 for r in runs),
        "same_answer_every_run": len({tuple(r.completion.token_ids) for r in runs}) == 1,
    }


def batch_run(engine: Engine, items: list[tuple[str, str | None]], max_tokens: int, warmup: bool = True):
    """(throughput dict, timed results) of one batch submitted at once; optionally warmed up first."""
    params = SamplingParams(max_tokens=max_tokens)
    if warmup:
        run_requests(engine, items, params)
    timed = run_requests(engine, items, params)
    return throughput(timed), timed


def full_batch(engine: Engine, prompts: list[str], rows: int, max_tokens: int) -> dict:
    """`rows` requests (the prompts cycled) submitted at once, in process, after one warm-up run of
    the same batch: their throughput, and the engine's step-loop figures over the timed run
    (mistral_qa.engine.stats.summary: ms and rows per decode step, where the seconds went)."""
    from mistral_qa.engine.stats import summary

    items = [(prompts[i % len(prompts)], None) for i in range(rows)]
    params = SamplingParams(max_tokens=max_tokens)
    run_requests(engine, items, params)
    before = engine.stats()
    timed = run_requests(engine, items, params)
    return {**throughput(timed), "engine": {"actors": 1, **summary(engine.stats(since=before))}}
