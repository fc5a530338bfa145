"""Reading a decode step's tokens on a GPU (skipped without one): the runner launches step N+1 before
it reads step N, so the read must wait for step N's own work only, never for the step queued after it."""

from __future__ import annotations

import time

import pytest
import torch

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.sampling import choose

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=ModelConfig(source="random", name="tiny-mistral"), device="cuda", compile=False))
    yield eng
    eng.close()


def test_reading_a_step_does_not_wait_for_the_step_launched_after_it(engine):
    rows = [
        engine.make_request("Hi", SamplingParams(max_tokens=4)),
        engine.make_request("Hello", SamplingParams(max_tokens=4, logprobs=True, top_logprobs=2)),
    ]
    logits = torch.randn(2, 32000, device="cuda")
    expected = logits.argmax(dim=-1).tolist()
    choice = choose(logits.clone(), rows)
    torch.cuda._sleep(2_000_000_000)  # the next step, queued behind this one: about a second of GPU work
    started = time.perf_counter()
    read = choice.read()
    waited = time.perf_counter() - started
    torch.cuda.synchronize()
    assert waited < 0.3, f"reading waited {waited:.2f} s: it waited for the work queued after the step"
    assert [token for token, _ in read] == expected and read[0][1] is None
    logprob, top = read[1][1]
    assert len(top) == 2 and top[0][0] == expected[1] and logprob == pytest.approx(top[0][1])
