"""OpenAIService in-process, over a real engine on the tiny random Mistral (no Ray, no HTTP): what
only the event loop can show -- tokenising never blocks it, and admission is counted before the
first await, so a burst of streams never gets more than max_pending accepted."""

from __future__ import annotations

import asyncio

import pytest

from serve.errors import OpenAIError
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.service import OpenAIService, ServeSettings

MAX_PENDING = 3


@pytest.fixture(scope="module")
def service():
    from mistral_qa.engine import Engine

    settings = ServeSettings.model_validate(
        {
            "engine": {"model": {"source": "random", "name": "tiny-mistral"}, "max_batch_size": 2},
            "max_pending": MAX_PENDING,
        }
    )
    engine = Engine(settings.engine)
    yield OpenAIService(engine, settings)
    engine.close()


async def ticks_during(coroutine) -> tuple[int, object]:
    """How often another task ran on the event loop while `coroutine` ran, and its result or error."""
    ticks = 0
    running = True

    async def heartbeat():
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    start = ticks
    try:
        result = await coroutine
    except OpenAIError as err:
        result = err
    running = False
    await beat
    return ticks - start, result


def test_tokenising_runs_off_the_event_loop(service):
    # Under the cheap character bound, over the context once tokenised: the engine must tokenise it.
    prompt = "sleep " * (service.max_prompt_chars // 7)
    body = CompletionRequest.model_validate({"model": "base", "prompt": prompt})
    ticks, result = asyncio.run(ticks_during(service.completions(body)))
    assert isinstance(result, OpenAIError) and result.body.error.code == "context_length_exceeded"
    assert "tokens" in result.body.error.message  # refused after tokenising, not by the character bound
    assert ticks > 0, "the event loop was blocked while the prompt was tokenised"


def test_a_burst_of_streams_admits_exactly_max_pending(service):
    async def burst():
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True}
        calls = [service.chat(ChatCompletionRequest.model_validate(body)) for _ in range(4 * MAX_PENDING)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, OpenAIError) and r.status == 429]
        assert len(accepted) == MAX_PENDING and len(refused) == 3 * MAX_PENDING, results
        assert service.in_flight == MAX_PENDING
        for response in accepted:  # drain the accepted streams: each ends with [DONE] and frees its place
            events = [item async for item in response.body_iterator]
            assert events[-1] == "data: [DONE]\n\n"
        assert service.in_flight == 0

    asyncio.run(burst())


def test_refused_requests_leave_nothing_counted(service):
    async def refused():
        for body in [{"model": "nope", "prompt": "hi"}, {"model": "base", "prompt": "sleep " * 5000}]:
            with pytest.raises(OpenAIError):
                await service.completions(CompletionRequest.model_validate(body))
        assert service.in_flight == 0

    asyncio.run(refused())
