"""Engine.check_health (serving's health check calls it): a healthy engine passes; a step stuck past
the bound, an engine thread that really died, and a closed engine each raise EngineFailure saying why."""

from __future__ import annotations

import threading
import time

import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, EngineFailure, SamplingParams
from mistral_qa.engine.engine_thread import STEP_TIMEOUT_S

TINY = ModelConfig(source="random", name="tiny-mistral")
PARAMS = SamplingParams(max_tokens=4)


class Kill(BaseException):
    """Not an Exception: the step loop does not catch it, so it ends the engine thread."""


@pytest.fixture
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=2))
    yield eng
    eng.close()


def test_healthy_engine_passes(engine):
    assert STEP_TIMEOUT_S >= 60  # first-use compiles of new shapes must not count as a hang
    engine.check_health()
    engine.generate(["Hi"], PARAMS)
    engine.check_health()


def test_a_stuck_step_is_unhealthy_until_it_ends(engine):
    """A request's callback blocks the engine thread inside a step (as a hung kernel would)."""
    engine.engine_thread.step_timeout_s = 0.2
    release, blocked, done = threading.Event(), threading.Event(), threading.Event()

    def on_delta(delta):
        blocked.set()
        release.wait(30)
        if delta.finished:
            done.set()

    request = engine.make_request("Hi", PARAMS)
    request.on_delta = on_delta
    engine.submit(request)
    assert blocked.wait(30)
    time.sleep(0.3)
    with pytest.raises(EngineFailure, match="a step has been running for"):
        engine.check_health()
    release.set()
    assert done.wait(30)
    engine.check_health()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dead_engine_thread_is_unhealthy_and_refuses_requests(engine):
    request = engine.make_request("Hi", PARAMS)

    def on_delta(delta):
        raise Kill("boom")

    request.on_delta = on_delta
    engine.submit(request)
    assert engine.engine_thread.join(30), "the engine thread should have died"
    with pytest.raises(EngineFailure, match="the engine thread died: Kill: boom"):
        engine.check_health()
    with pytest.raises(EngineFailure, match="thread died"):  # refused at once, not queued forever
        engine.generate(["Hi"], PARAMS)


def test_a_closed_engine_is_unhealthy(engine):
    engine.close()
    with pytest.raises(EngineFailure, match="closed"):
        engine.check_health()
