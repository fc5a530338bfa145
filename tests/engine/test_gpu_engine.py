"""The engine on a GPU (skipped without one), with each decode attention: CUDA graphs + the compiled
decode layer give the same greedy tokens as the eager CUDA path, and a request's answer does not depend
on what it is batched with."""

from __future__ import annotations

import pytest
import torch

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.graphs import DecodeSteps
from mistral_qa.engine.wiring import decode_layer
from mistral_qa.prompt import build_prompt

pytestmark = pytest.mark.gpu

TINY = ModelConfig(source="random", name="tiny-mistral")
PROMPTS = [
    build_prompt(f"Question {i}: how does phone use at night affect sleep and mood? " * (1 + i % 5)) for i in range(40)
]
PARAMS = SamplingParams(max_tokens=48)


@pytest.fixture(scope="module", params=["sdpa", "flex"])
def engine(request):
    eng = Engine(
        EngineConfig(model=TINY, device="cuda", max_batch_size=64, max_context=1024, decode_attention=request.param)
    )
    yield eng
    eng.close()


def tokens(engine, prompts):
    return [c.token_ids for c in engine.generate(prompts, PARAMS)]


def test_start_up_reports_compiling_and_graph_capture(engine):
    """The warm-up's report splits the first answer: torch.compile's compiling and the first CUDA graph."""
    startup = engine.startup
    assert 0 < startup["compile_s"] <= startup["first_answer_s"]
    assert 0 < startup["graph_capture_s"] <= startup["first_answer_s"]
    stats = engine.stats()
    assert stats["graphs"] == len(engine.runner.steps.graphs) >= 1 and stats["capture_s"] > 0


def test_graph_replay_equals_running_the_same_step_directly(engine):
    """CUDA graphs replay exactly the kernels of the compiled step: same tokens as running it uncaptured."""
    runner = engine.runner
    fast = tokens(engine, PROMPTS)
    assert runner.steps.graphs, "decode steps should have been replayed from CUDA graphs"
    runner.steps = DecodeSteps(runner.decoder, use_graphs=False)  # keeps the compiled layer
    try:
        direct = tokens(engine, PROMPTS)
    finally:
        runner.steps = DecodeSteps(runner.decoder)
    assert fast == direct


def test_compiled_and_plain_layers_agree_on_the_first_tokens(engine):
    """Fused kernels round differently from the plain ops; greedy answers still start the same."""
    runner = engine.runner
    compiled = runner.decoder.decode_layer
    fast = tokens(engine, PROMPTS[:8])
    runner.decoder.decode_layer = decode_layer  # the plain layer
    runner.steps = DecodeSteps(runner.decoder, use_graphs=False)
    try:
        plain = tokens(engine, PROMPTS[:8])
    finally:
        runner.decoder.decode_layer = compiled
        runner.steps = DecodeSteps(runner.decoder)
    assert all(f[:4] == p[:4] for f, p in zip(fast, plain, strict=True))


def test_answers_do_not_depend_on_the_batch(engine):
    together = tokens(engine, PROMPTS)
    alone = [tokens(engine, [p])[0] for p in PROMPTS[:8]]
    assert together[:8] == alone


def test_float16_engine_follows_generate_on_the_first_tokens(engine):
    """fp16 kernels differ from transformers' in rounding; the first greedy tokens still agree."""
    model, tok = engine.model, engine.tokenizer
    inputs = tok(PROMPTS[0], return_tensors="pt").to("cuda")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    [c] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8))
    assert c.token_ids[:4] == ref[:4]


def test_packed_prefill_equals_one_attention_call_per_prompt(engine, monkeypatch):
    """On CUDA a prefill pack runs all its prompts through one variable-length flash-attention call;
    each prompt's last-token logits match attending prompt by prompt, and a prompt's own numbers do
    not depend on what it is packed with."""
    from mistral_qa.engine import decoder as module

    dec = engine.runner.decoder
    assert module.packed_attention(dec.device, dec.dtype)
    prompts = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:6]]
    assert len({len(p) for p in prompts}) > 1
    packed = dec.prefill(prompts, 0, [-1] * 6, pad_tokens=1024, pad_rows=64)
    alone = dec.prefill(prompts[3:4], 0, [-1], pad_tokens=1024, pad_rows=64)
    monkeypatch.setattr(module, "packed_attention", lambda device, dtype: False)
    looped = dec.prefill(prompts, 0, [-1] * 6, pad_tokens=1024, pad_rows=64)
    torch.testing.assert_close(packed, looped, atol=2e-2, rtol=0)
    assert torch.equal(packed.argmax(-1), looped.argmax(-1))
    assert torch.equal(packed[3], alone[0])


def test_chunked_prefill_follows_whole_prefill(engine):
    """A prompt prefilled in 32-token chunks (SDPA over the slot's cache with an offset causal mask)
    ends with the same last-token logits, within fp16 rounding, as prefilling it whole."""
    dec = engine.runner.decoder
    prompt = engine.tokenizer(PROMPTS[4])["input_ids"]
    assert len(prompt) > 3 * 32
    whole = dec.prefill([prompt], 0, [-1], pad_tokens=1024, pad_rows=64)
    for start in range(0, len(prompt), 32):
        chunked = dec.prefill_chunk(prompt[start : start + 32], 1, start, -1, pad_tokens=32, pad_rows=64)
    torch.testing.assert_close(chunked, whole, atol=2e-2, rtol=0)
    assert torch.equal(chunked.argmax(-1), whole.argmax(-1))
    keys = dec.cache.keys[0]
    torch.testing.assert_close(keys[1, :, : len(prompt)], keys[0, :, : len(prompt)], atol=2e-2, rtol=0)


def test_sampling_features_do_not_depend_on_the_batch(engine):
    """Penalties (counts on the GPU) and logprobs: the same tokens and the same logprobs, to the bit,
    alone and in a batch of eight (padded shapes make a row's numbers independent of its batch)."""
    params = SamplingParams(max_tokens=24, logprobs=True, top_logprobs=3, frequency_penalty=0.5, presence_penalty=0.3)
    together = engine.generate(PROMPTS[:8], params)
    alone = [engine.generate([p], params)[0] for p in PROMPTS[:3]]
    assert [c.token_ids for c in together[:3]] == [c.token_ids for c in alone]
    assert [c.logprobs for c in together[:3]] == [c.logprobs for c in alone]


def test_json_schema_rows_on_cuda(engine):
    """Grammar masks move to the GPU each step and grammar rows do not run ahead: every answer is
    JSON that validates, and free answers are the same before and after."""
    import json

    import jsonschema

    from mistral_qa.sampling import StructuredOutput

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    params = SamplingParams(max_tokens=32, structured=StructuredOutput(type="json_schema", json_schema=schema))
    free = tokens(engine, PROMPTS[:4])
    shaped = engine.generate(PROMPTS[:4], params)
    for c in shaped:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    assert tokens(engine, PROMPTS[:4]) == free
