"""The engine's step-loop counters (mistral_qa.engine.stats) on the real tiny engine: they add up to
what a generate call did, and the difference of two snapshots holds only the work between them."""

from __future__ import annotations

import time

import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.stats import difference, summary
from mistral_qa.prompt import build_prompt

TINY = ModelConfig(source="random", name="tiny-mistral")
PROMPTS = [
    build_prompt(q)
    for q in [
        "Does phone use before bed hurt sleep?",
        "Explain how blue light from screens affects melatonin.",
        "Is texting while walking dangerous?",
        "Hi",
        "List three ways to reduce neck strain when reading on a phone.",
        "Can screen time affect mood?",
    ]
]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4))
    yield eng
    eng.close()


def settled(engine: Engine) -> dict:
    """The counters once the engine thread is idle: an answer reaches its caller mid-step, before
    that step's seconds are added."""
    while True:
        first = engine.stats()
        time.sleep(0.05)
        if engine.stats() == first:
            return first


def test_counters_add_up_to_one_generate(engine):
    before = settled(engine)
    started = time.perf_counter()
    results = engine.generate(PROMPTS, PARAMS)
    s = difference(settled(engine), before)
    wall = time.perf_counter() - started
    assert s["prefill_prompts"] == len(PROMPTS) and 1 <= s["prefill_calls"] <= len(PROMPTS)
    assert s["prefill_tokens"] == sum(c.prompt_tokens for c in results)
    # Every token after a row's first comes from a decode step; a row that a step ends was already
    # in the next one (launched before the tokens are read): at most one wasted row-step each.
    decoded = sum(c.completion_tokens - 1 for c in results)
    assert decoded <= s["rows"] <= decoded + len(PROMPTS)
    assert s["steps"] > 0 and 1 <= s["rows"] / s["steps"] <= 4  # max_batch_size
    assert s["context_columns"] == s["longest"] > 0  # CPU: exact shapes, no padding
    parts = [s[k] for k in ("launch_s", "gpu_wait_s", "text_s", "prefill_s")]
    assert min(parts) >= 0 and s["prefill_s"] > 0 and s["launch_s"] > 0
    assert sum(parts) <= s["busy_s"] <= wall


def test_a_difference_holds_only_its_window(engine):
    engine.generate(PROMPTS[:2], PARAMS)
    between = settled(engine)
    results = engine.generate(PROMPTS[2:5], PARAMS)
    after = settled(engine)
    window = engine.stats(since=between)
    assert window == difference(after, between)
    assert window["prefill_prompts"] == 3 and window["prefill_tokens"] == sum(c.prompt_tokens for c in results)
    assert window["steps"] >= max(c.completion_tokens for c in results) - 1
    assert after["prefill_prompts"] - window["prefill_prompts"] >= 2 + 1  # the first call and the warm-up


def test_summary_gives_per_step_figures(engine):
    before = settled(engine)
    engine.generate(PROMPTS, PARAMS)
    window = difference(settled(engine), before)
    s = summary(window)
    assert s["steps"] == window["steps"] and s["rows_per_step"] == window["rows"] / window["steps"]
    assert s["ms_per_step"] == window["busy_s"] * 1000 / window["steps"]
    named = sum(window[k] for k in ("launch_s", "gpu_wait_s", "text_s", "prefill_s"))
    assert s["other_s"] == window["busy_s"] - named >= 0
    assert summary(difference(before, before))["ms_per_step"] == 0.0  # an empty window: no division by zero
