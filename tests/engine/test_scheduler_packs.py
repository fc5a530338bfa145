"""The scheduler's prefill packs when the engine is slot-bound: a small last pack waits for rows to
finish instead of costing a whole (on CUDA, padded) prefill forward for a few prompts; it never waits
while slots are plentiful, while nothing decodes, past a tenth of the slots free, or past HOLD_S."""

from __future__ import annotations

import concurrent.futures

from mistral_qa.engine import Request, SamplingParams
from mistral_qa.engine.scheduler import HOLD_S, Scheduler

PACK = 1024


def request(tokens: int) -> Request:
    return Request(list(range(1, tokens + 1)), SamplingParams(max_tokens=8), None, None, "cpu")


def scheduler(slots: int, running: int, waiting: list[int]) -> Scheduler:
    """`running` rows already decoding, and requests of these prompt lengths waiting."""
    s = Scheduler([], slots, max_context=4096)
    s.rows = [request(10) for _ in range(running)]
    for tokens in waiting:
        s.add(request(tokens))
    s.clock = lambda: 0.0
    return s


def admitted(s: Scheduler) -> list[int]:
    return [r.prompt_tokens for pack in s.plan_admission(PACK).packs for r in pack]


def test_a_small_pack_waits_while_the_engine_is_slot_bound():
    s = scheduler(512, running=510, waiting=[50] * 100)  # 2 free slots, 100 waiting: 100 tokens
    assert admitted(s) == [] and len(s.waiting) == 100  # held back, in order, nothing lost
    s.rows = s.rows[:500]  # 12 free: 600 tokens, over half a pack
    assert admitted(s) == [50] * 12 and len(s.waiting) == 88


def test_it_waits_at_most_hold_s():
    s = scheduler(512, running=510, waiting=[50] * 100)
    assert admitted(s) == []
    s.clock = lambda: HOLD_S / 2
    assert admitted(s) == []
    s.clock = lambda: HOLD_S
    assert admitted(s) == [50, 50]
    s.clock = lambda: HOLD_S + 0.01  # a new wait starts after an admission
    assert admitted(s) == []


def test_it_waits_at_most_until_a_tenth_of_the_slots_are_free():
    s = scheduler(512, running=512 - 51, waiting=[5] * 100)  # 51 free slots hold only 255 tokens
    assert admitted(s) == [5] * 51


def test_full_packs_go_and_only_the_small_last_one_waits():
    s = scheduler(512, running=470, waiting=[100] * 100)  # 42 free: four packs of 1,000 tokens, then 200
    plan = s.plan_admission(PACK)
    assert [len(p) for p in plan.packs] == [10, 10, 10, 10] and len(s.waiting) == 60


def test_no_waiting_when_every_waiting_request_fits_or_nothing_decodes():
    assert admitted(scheduler(64, running=60, waiting=[30])) == [30]  # requests arriving one by one
    assert admitted(scheduler(512, running=0, waiting=[50] * 600)) == [50] * 512  # the engine's start
    assert admitted(scheduler(4, running=3, waiting=[10] * 5)) == [10]  # few slots: a tenth is none


def run_slot_bound(engine, monkeypatch, hold: bool) -> tuple[list[list[int]], int]:
    """200 prompts for 40 slots through the engine's own thread, answers of 3 to 22 tokens so rows end
    a few at a time; with hold=False a pack never waits. Returns the greedy answers' tokens and the
    prefill forwards."""
    from mistral_qa.engine import scheduler as module
    from mistral_qa.prompt import build_prompt

    monkeypatch.setattr(module, "HOLD_S", module.HOLD_S if hold else 0.0)
    before = engine.stats()
    futures = []
    for i in range(200):
        request = engine.make_request(build_prompt(f"Question {i}: does scrolling at night cost sleep?"),
                                      SamplingParams(max_tokens=3 + i % 20, temperature=0.0))  # fmt: skip
        future = concurrent.futures.Future()
        request.on_delta = lambda d, f=future: f.set_result(d.completion) if d.completion else None
        futures.append(future)
        engine.submit(request)
    answers = [f.result(timeout=120).token_ids for f in futures]
    return answers, engine.stats(since=before)["prefill_calls"]


def test_the_engine_prefills_fewer_packs_and_answers_the_same(monkeypatch):
    from mistral_qa.config import ModelConfig
    from mistral_qa.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=ModelConfig(source="random", name="tiny-mistral"), max_batch_size=40))
    try:
        held, held_packs = run_slot_bound(engine, monkeypatch, hold=True)
        eager, eager_packs = run_slot_bound(engine, monkeypatch, hold=False)
    finally:
        engine.close()
    assert held == eager
    assert held_packs <= 0.8 * eager_packs, (held_packs, eager_packs)  # 35-37 against 56 when written
