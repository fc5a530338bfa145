"""Chunked prefill on the tiny Mistral (CPU): prompts longer than engine.prefill_tokens are prefilled
a chunk per step, and the running rows decode between the chunks. Answers stay plain `generate`'s,
alone and batched, in exact and in CUDA-padded shapes."""

from __future__ import annotations

import pytest
import torch

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.graphs import DecodeSteps
from mistral_qa.prompt import build_prompt

TINY = ModelConfig(source="random", name="tiny-mistral")
CHUNK = 32
MAX_NEW = 16
PARAMS = SamplingParams(max_tokens=MAX_NEW)
LONG = [build_prompt("Tell me about sleep and screens. " * 40), build_prompt("Why do phones hurt sleep? " * 12)]
SHORT = ["Hi", "Is texting while walking dangerous?"]  # no template: shorter than a chunk


def reference(model, tokenizer, prompt: str) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=3, prefill_tokens=CHUNK))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def references(engine) -> dict[str, list[int]]:
    return {p: reference(engine.model, engine.tokenizer, p) for p in [*LONG, *SHORT]}


def test_long_prompts_are_chunked_and_equal_generate(engine, references):
    """The first prompt (> 256 tokens) also grows the CPU cache between its chunks."""
    lengths = [engine.count_tokens(p) for p in LONG]
    assert lengths[0] > 256 and all(n > 2 * CHUNK for n in lengths)
    runner = engine.runner
    calls = runner.stats.prefill_calls
    [c] = engine.generate([LONG[0]], PARAMS)
    assert runner.stats.prefill_calls - calls == -(-lengths[0] // CHUNK)  # one forward per chunk
    assert c.token_ids == references[LONG[0]]
    assert c.prompt_tokens == lengths[0]


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "cuda-shapes"])
def test_answers_do_not_depend_on_the_batch(engine, references, padded):
    """Long and short prompts together, more than the slots (rows leave, newcomers join, the long
    ones take turns in the chunking slot): every answer is the one it gets alone, and `generate`'s."""
    runner = engine.runner
    runner.steps = DecodeSteps(runner.decoder, padded=padded, prefill_tokens=CHUNK)
    try:
        prompts = [LONG[0], SHORT[0], LONG[1], SHORT[1], LONG[1], SHORT[0]]
        together = [c.token_ids for c in engine.generate(prompts, PARAMS)]
        alone = [engine.generate([p], PARAMS)[0].token_ids for p in prompts[:4]]
    finally:
        runner.steps = DecodeSteps(runner.decoder, prefill_tokens=CHUNK)
    assert together[:4] == alone
    assert together == [references[p] for p in prompts]


def test_running_rows_decode_between_chunks(engine, references):
    """Steps the runner from this thread (the engine thread parked): a short request runs, then a long
    prompt arrives; the short one gets a token after every chunk of the long one."""
    engine.engine_thread.wait_parked()
    runner = engine.runner
    running = engine.make_request(SHORT[1], SamplingParams(max_tokens=64))
    long = engine.make_request(LONG[0], PARAMS)
    seen = []  # the running row's token count at each chunk
    chunk = runner.decoder.prefill_chunk

    def recording_chunk(*args, **kwargs):
        seen.append(len(running.token_ids))
        return chunk(*args, **kwargs)

    runner.decoder.prefill_chunk = recording_chunk
    try:
        runner.add(running)
        runner.step()
        assert running.token_ids and runner.running == 1
        runner.add(long)
        while runner.has_work():
            runner.step()
    finally:
        del runner.decoder.prefill_chunk
    assert len(seen) == -(-long.prompt_tokens // CHUNK)
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
    assert long.token_ids == references[LONG[0]]
