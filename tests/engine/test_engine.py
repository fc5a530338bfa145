"""The generation engine on the tiny Mistral (fp32, CPU): greedy output equals plain
`model.generate`, alone and in every batch shape the engine forms; adapters, sampling, stopping."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from pydantic import ValidationError

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, PromptTooLong, SamplingParams, UnknownModel
from mistral_qa.prompt import build_prompt

TINY = ModelConfig(source="random", name="tiny-mistral")
QUESTIONS = [
    "Does phone use before bed hurt sleep?",
    "Why?",
    "Explain in detail how blue light from screens affects melatonin, sleep onset and next-day attention in teenagers.",
    "Is texting while walking dangerous?",
    "List three ways to reduce neck strain when reading on a phone, and say which one matters most and why.",
    "Hi",
    "What does the 20-20-20 rule for eyes say?",
    "How loud is too loud for earbuds, and for how long?",
    "Can screen time affect mood?",
    "Should children under two use tablets?",
    "Give one tip.",
]
PROMPTS = [build_prompt(q) for q in QUESTIONS]
MAX_NEW = 24


def reference(model, tokenizer, prompt: str, max_new: int = MAX_NEW) -> list[int]:
    """Plain transformers greedy generation for one prompt (no padding)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def references(engine) -> list[list[int]]:
    return [reference(engine.model, engine.tokenizer, p) for p in PROMPTS]


def test_single_prompt_equals_generate(engine, references):
    [c] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_NEW))
    assert c.token_ids == references[0]
    assert c.completion_tokens == MAX_NEW and c.finish_reason == "length"
    assert c.prompt_tokens == engine.count_tokens(PROMPTS[0])


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_batched_equals_generate(references, batch):
    """More prompts than max_batch_size: rows finish and newcomers join a running batch."""
    eng = Engine(EngineConfig(model=TINY, max_batch_size=batch))
    try:
        results = eng.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW))
    finally:
        eng.close()
    assert [c.token_ids for c in results] == references


def test_uneven_lengths_join_running_batch(engine, references):
    """Different max_tokens per request make rows leave at different steps; results stay exact."""
    requests = [engine.make_request(p, SamplingParams(max_tokens=4 + 2 * i)) for i, p in enumerate(PROMPTS)]
    done = {}
    finished = threading.Event()

    def on_delta_for(i):
        def on_delta(delta):
            if delta.finished:
                done[i] = delta.completion
                if len(done) == len(requests):
                    finished.set()

        return on_delta

    for i, req in enumerate(requests):
        req.on_delta = on_delta_for(i)
        engine.submit(req)
    assert finished.wait(60)
    for i, ref in enumerate(references):
        expected = ref[: 4 + 2 * i]
        assert done[i].token_ids == expected, i


def test_adapters_and_base_in_one_engine(tiny_adapter):
    """Two adapters and the base in one engine; each matches PEFT's own generate with/without the adapter."""
    from peft import PeftModel

    from mistral_qa.model import load_base_model, load_tokenizer

    adapters = {"tiny": str(tiny_adapter), "tiny-copy": str(tiny_adapter)}
    eng = Engine(EngineConfig(adapters=adapters, max_batch_size=3))
    try:
        assert eng.model_names == ["base", "tiny", "tiny-copy"]
        assert eng.training_config["prompt_template"] == "alpaca"
        tuned = eng.generate(PROMPTS[:5], SamplingParams(max_tokens=MAX_NEW), adapter="tiny")
        plain = eng.generate(PROMPTS[:5], SamplingParams(max_tokens=MAX_NEW), adapter="base")
        copy = eng.generate(PROMPTS[:5], SamplingParams(max_tokens=MAX_NEW), adapter="tiny-copy")
    finally:
        eng.close()
    assert [c.token_ids for c in copy] == [c.token_ids for c in tuned]
    tok = load_tokenizer(TINY)
    base = load_base_model(TINY, torch.float32)
    assert [c.token_ids for c in plain] == [reference(base, tok, p) for p in PROMPTS[:5]]
    peft_model = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()
    assert [c.token_ids for c in tuned] == [reference(peft_model, tok, p) for p in PROMPTS[:5]]


def test_merged_adapter_serves_only_the_adapter(tiny_adapter):
    eng = Engine(EngineConfig(adapters={"tiny": str(tiny_adapter)}, merge_adapter=True))
    try:
        assert eng.model_names == ["tiny"]
        [c] = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=8), adapter="tiny")
        assert c.completion_tokens == 8
        with pytest.raises(UnknownModel):
            eng.generate([PROMPTS[0]], SamplingParams(max_tokens=8))
    finally:
        eng.close()


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    alone = engine.generate([PROMPTS[1]], params)[0].token_ids
    batched = engine.generate(PROMPTS[:6], params)[1].token_ids
    assert alone == batched
    other = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0.9, seed=8))[0].token_ids
    assert other != alone


def test_the_templates_stop_strings_come_from_the_caller(engine, references):
    text = engine.tokenizer.decode(references[0], skip_special_tokens=True).lstrip()
    stop = text[5:9]
    [c] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_NEW), template_stop=(stop,))
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)].rstrip()
    [whole] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_NEW))  # the engine adds none itself
    assert whole.token_ids == references[0]


def test_stop_strings_cut_the_answer(engine, references):
    text = engine.tokenizer.decode(references[0], skip_special_tokens=True).lstrip()
    stop = text[5:9]
    [c] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_NEW, stop=[stop]))
    assert c.finish_reason == "stop"
    assert c.text == text[: text.index(stop)].rstrip()
    assert stop not in c.text


def test_stream_pieces_add_up_to_the_text(engine):
    async def collect():
        request = engine.make_request(PROMPTS[2], SamplingParams(max_tokens=MAX_NEW))
        return [d async for d in engine.stream(request)]

    deltas = asyncio.run(collect())
    assert deltas[-1].completion is not None
    assert "".join(d.text for d in deltas) == deltas[-1].completion.text
    assert len(deltas) > 2


def test_stream_interval_merges_pieces(engine):
    """With min_interval the same text arrives in fewer, larger pieces (one HTTP message per interval)."""

    async def collect(interval):
        request = engine.make_request(PROMPTS[2], SamplingParams(max_tokens=MAX_NEW))
        return [d async for d in engine.stream(request, min_interval=interval)]

    every = asyncio.run(collect(0.0))
    merged = asyncio.run(collect(0.2))
    assert "".join(d.text for d in merged) == merged[-1].completion.text == every[-1].completion.text
    assert len(merged) < len(every)


def test_context_limit_ends_with_length():
    eng = Engine(EngineConfig(model=TINY, max_context=64))
    try:
        n = eng.count_tokens(PROMPTS[0])
        [c] = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=500))
        assert c.finish_reason == "length" and n + c.completion_tokens == 64
        with pytest.raises(PromptTooLong):
            eng.generate([build_prompt("word " * 80)], SamplingParams())
    finally:
        eng.close()


@pytest.mark.parametrize(
    "fields",
    [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": [""]}, {"top_k": -2}, {"top_logprobs": 3}],
)
def test_bad_parameters_are_rejected(fields):
    """SamplingParams validates on construction: a bad value never reaches the engine."""
    with pytest.raises(ValidationError, match=next(iter(fields))):
        SamplingParams(**fields)


def test_unknown_adapter(engine):
    with pytest.raises(UnknownModel, match="nope"):
        engine.generate(["hi"], SamplingParams(), adapter="nope")


def test_engine_warms_up_before_it_is_returned(caplog):
    """Compiling and capturing (on a GPU) happen in the constructor, not in the first user's request."""
    import logging

    with caplog.at_level(logging.INFO, logger="mistral_qa.engine.core"):
        eng = Engine(EngineConfig(model=TINY, max_batch_size=2))
    try:
        assert any("warmed up" in r.getMessage() for r in caplog.records)
        assert eng.pending == 0
    finally:
        eng.close()
