"""benchmarks/engine_probe.py on the tiny Mistral (CPU): the decode step and the prefill pack run
alone, only while the engine is idle, and leave it answering as before."""

from __future__ import annotations

import pytest

from benchmarks import engine_probe as probe
from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.prompt import build_prompt

TINY = ModelConfig(source="random", name="tiny-mistral")
PROMPT = build_prompt("Does phone use before bed hurt sleep?")


def test_probes_run_alone_and_leave_the_engine_as_it_was():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4, max_context=128, prefill_tokens=64))
    try:
        before = eng.generate([PROMPT], SamplingParams(max_tokens=12))[0].token_ids
        step = probe.decode_step(eng, 4, 100)
        step()
        ids = eng.tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
        pack, copies = probe.prefill_pack(eng, ids)
        pack()
        assert copies == max(1, min(64 // len(ids), 4))
        with pytest.raises(ValueError, match="rows 5"):
            probe.decode_step(eng, 5, 100)
        with pytest.raises(ValueError, match="context 129"):
            probe.decode_step(eng, 1, 129)
        assert eng.generate([PROMPT], SamplingParams(max_tokens=12))[0].token_ids == before
    finally:
        eng.close()


def test_probes_refuse_a_busy_engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=2, max_context=512))
    try:
        request = eng.make_request(PROMPT, SamplingParams(max_tokens=400))
        request.on_delta = lambda delta: None
        eng.submit(request)
        with pytest.raises(RuntimeError, match="answers nothing"):
            probe.decode_step(eng, 1, 10)
        request.cancel()
    finally:
        eng.close()
