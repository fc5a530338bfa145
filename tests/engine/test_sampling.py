"""Sampling features on the tiny Mistral (CPU): top_k, presence/frequency penalties (checked against
`generate` with the same penalties as a logits processor), logprobs (against `generate`'s scores;
streamed = not streamed; alone = batched) and structured output through the grammar (llguidance)."""

from __future__ import annotations

import asyncio
import json
import math

import jsonschema
import pytest
import torch
from pydantic import ValidationError
from transformers import LogitsProcessor, LogitsProcessorList

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, InvalidParameter, SamplingParams
from mistral_qa.engine.graphs import DecodeSteps
from mistral_qa.prompt import build_prompt
from mistral_qa.sampling import StructuredOutput

TINY = ModelConfig(source="random", name="tiny-mistral")
PROMPTS = [build_prompt(q) for q in ["Does phone use before bed hurt sleep?", "Hi", "Can screen time affect mood?"]]
REPETITIVE = "sleep sleep sleep sleep sleep sleep sleep sleep sleep sleep"
BOOLEAN_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4))
    yield eng
    eng.close()


class OpenAIPenalties(LogitsProcessor):
    """logit -= presence * (count > 0) + frequency * count over the generated tokens (OpenAI's definition)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0) - self.frequency * counts


def generate(engine, prompt: str, max_new: int, presence: float = 0.0, frequency: float = 0.0):
    inputs = engine.tokenizer(prompt, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([OpenAIPenalties(n, presence, frequency)])
    with torch.no_grad():
        out = engine.model.generate(
            **inputs,
            max_new_tokens=max_new,
            do_sample=False,
            logits_processor=processors,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, n:].tolist(), [s[0] for s in out.scores]


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_top_k_1_is_greedy(engine):
    greedy = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=16))]
    sampled = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3))
    assert [c.token_ids for c in sampled] == greedy
    wide = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=1.5, top_k=50, seed=3))
    assert [c.token_ids for c in wide] != greedy


def test_penalties_equal_generate_and_reduce_repeats(engine):
    plain = engine.generate([REPETITIVE], SamplingParams(max_tokens=32))[0].token_ids
    params = SamplingParams(max_tokens=32, presence_penalty=0.5, frequency_penalty=1.0)
    [penalised] = engine.generate([REPETITIVE], params)
    expected, _ = generate(engine, REPETITIVE, 32, presence=0.5, frequency=1.0)
    assert penalised.token_ids == expected
    assert penalised.token_ids != plain and repeats(penalised.token_ids) < repeats(plain)
    # Batch-invariant: penalised and plain rows together get what each gets alone.
    mixed = [engine.make_request(REPETITIVE, params), engine.make_request(REPETITIVE, SamplingParams(max_tokens=32))]
    assert [c.token_ids for c in complete_all(engine, mixed)] == [penalised.token_ids, plain]


def complete_all(engine, requests):
    async def run():
        return await asyncio.gather(*(engine.complete(r) for r in requests))

    return asyncio.run(run())


def test_logprobs_follow_the_model(engine):
    params = SamplingParams(max_tokens=12, logprobs=True, top_logprobs=5)
    [c] = engine.generate([PROMPTS[0]], params)
    expected, scores = generate(engine, PROMPTS[0], 12)
    assert c.token_ids == expected and len(c.logprobs) == c.completion_tokens
    for entry, token, score in zip(c.logprobs, c.token_ids, scores, strict=True):
        reference = torch.log_softmax(score.float(), dim=-1)
        assert entry.token_id == token and entry.token == engine.tokenizer.decode([token])
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        assert entry.logprob == pytest.approx(reference[token].item(), abs=1e-4)
        values = [lp for _, _, lp in entry.top]
        assert len(entry.top) == 5 and values == sorted(values, reverse=True)
        assert entry.top[0][0] == token  # greedy: the chosen token is the likeliest
    assert engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12))[0].logprobs is None


def test_logprobs_streamed_and_batched_are_the_same(engine):
    """Streamed pieces carry exactly the non-streamed logprobs. Batched: on the CPU's exact shapes the
    matmuls round differently per batch size (same tokens, logprobs within 1e-5); in the CUDA shapes
    (padded, bucketed: what a GPU runs) they are identical."""
    params = SamplingParams(max_tokens=12, logprobs=True, top_logprobs=2)
    [alone] = engine.generate([PROMPTS[1]], params)

    async def stream():
        return [d async for d in engine.stream(engine.make_request(PROMPTS[1], params))]

    deltas = asyncio.run(stream())
    assert [lp for d in deltas for lp in d.logprobs] == alone.logprobs == deltas[-1].completion.logprobs
    batched = engine.generate(PROMPTS, params)[1]
    assert batched.token_ids == alone.token_ids
    assert [lp.logprob for lp in batched.logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs], abs=1e-5)
    runner = engine.runner
    runner.steps = DecodeSteps(runner.decoder, padded=True)
    try:
        [padded_alone] = engine.generate([PROMPTS[1]], params)
        padded_batched = engine.generate(PROMPTS, params)[1]
    finally:
        runner.steps = DecodeSteps(runner.decoder)
    assert padded_batched.logprobs == padded_alone.logprobs


def structured(schema: dict | None) -> StructuredOutput:
    if schema is None:
        return StructuredOutput(type="json_object")
    return StructuredOutput(type="json_schema", json_schema=schema)


def test_json_schema_forces_a_valid_answer_from_a_random_model(engine):
    """Batched with free-text rows (which keep their own answers) and alone: the same valid JSON."""
    params = SamplingParams(max_tokens=32, structured=structured(BOOLEAN_SCHEMA), logprobs=True)
    free = engine.generate(PROMPTS, SamplingParams(max_tokens=16))
    requests = [engine.make_request(p, params) for p in PROMPTS[:2]]
    requests += [engine.make_request(p, SamplingParams(max_tokens=16)) for p in PROMPTS]
    results = complete_all(engine, requests)
    for c in results[:2]:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), BOOLEAN_SCHEMA)
        assert all(math.isfinite(lp.logprob) for lp in c.logprobs)
    assert [c.token_ids for c in results[2:]] == [c.token_ids for c in free]
    assert results[0].token_ids == engine.generate([PROMPTS[0]], params)[0].token_ids


def test_json_object_is_json_or_cut_by_length(engine):
    """A random model may write a string forever; the grammar still keeps every token JSON."""
    for prompt in PROMPTS:
        [c] = engine.generate([prompt], SamplingParams(max_tokens=24, structured=structured(None)))
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.finish_reason == "length" and c.completion_tokens == 24


@pytest.mark.parametrize("schema", [{"type": "objectx"}, {"type": "string", "pattern": "(("}])
def test_bad_json_schema_is_refused_at_make_request(engine, schema):
    # The schema is refused where settings are read (mistral_qa.sampling); the engine still refuses
    # one that got past that (built without validation) before any step.
    with pytest.raises(ValidationError, match="JSON schema"):
        structured(schema)
    unchecked = StructuredOutput.model_construct(type="json_schema", json_schema=schema)
    with pytest.raises(InvalidParameter, match="JSON schema") as err:
        engine.make_request(
            PROMPTS[0], SamplingParams.model_construct(**{**SamplingParams().__dict__, "structured": unchecked})
        )
    assert err.value.param == "response_format"
