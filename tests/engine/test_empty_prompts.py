"""Prompts the engine must refuse, at every level: a 0-token prompt has no last token, so prefill
would hand it the logits of whatever prompt sits before it in the pack (another user's prompt)."""

from __future__ import annotations

import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, InvalidParameter, Request, SamplingParams
from mistral_qa.engine.textstream import TextStream
from mistral_qa.prompt import STOP_STRINGS, build_prompt

TINY = ModelConfig(source="random", name="tiny-mistral")
PARAMS = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4))
    yield eng
    eng.close()


def run_directly(engine: Engine, requests: list[Request]) -> list:
    """Queue `requests` together and step the engine's runner from this thread until they are done:
    they are admitted in one step, so they share one prefill pack. Once the engine thread is parked
    (nothing is submitted to it meanwhile), only this thread touches the runner."""
    engine.engine_thread.wait_parked()
    runner = engine.runner
    results: list = [None] * len(requests)
    for i, request in enumerate(requests):
        request.on_delta = lambda d, i=i: results.__setitem__(i, d) if d.finished else None
        runner.add(request)
    calls = runner.stats.prefill_calls
    while runner.has_work():
        runner.step()
    assert runner.stats.prefill_calls == calls + 1, "the requests should have shared one prefill pack"
    return results


def request(engine: Engine, ids: list[int]) -> Request:
    """A Request built directly, bypassing make_request's checks."""
    return Request(ids, PARAMS, None, TextStream(engine.tokenizer, STOP_STRINGS), engine.device)


def test_empty_prompt_in_a_pack_fails_alone_and_reads_nothing(engine):
    """Before the fix the empty row took the victim's last-token logits and continued its prompt."""
    victim_ids = engine.tokenizer(build_prompt("What is my bank password?"))["input_ids"]
    [alone] = engine.generate([build_prompt("What is my bank password?")], PARAMS)
    victim, empty, after = run_directly(
        engine, [request(engine, victim_ids), request(engine, []), request(engine, [1])]
    )
    assert isinstance(empty.error, InvalidParameter) and empty.error.param == "prompt"
    assert empty.completion is None
    assert victim.error is None and victim.completion.token_ids == alone.token_ids
    assert after.error is None and after.completion.completion_tokens > 0


def test_decoder_refuses_an_empty_prompt(engine):
    decoder = engine.runner.decoder
    with pytest.raises(ValueError, match="at least one token"):
        decoder.prefill([[1, 2, 3], []], 0, [-1, -1])
