"""The engine's GPU-shaped paths, checked on the CPU: padded (bucketed) step shapes, the
torch.compile'd decode layer, several adapters mixed in one decode step, the slot cache growing,
and the unsupported-architecture error. Greedy tokens must equal plain `generate`."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.graphs import DecodeSteps
from mistral_qa.engine.support import check_supported
from mistral_qa.model import ModelLoadError
from mistral_qa.prompt import build_prompt

TINY = ModelConfig(source="random", name="tiny-mistral")
PROMPTS = [
    build_prompt(q)
    for q in [
        "Does phone use before bed hurt sleep?",
        "Explain in detail how blue light from screens affects melatonin and next-day attention in teenagers.",
        "Is texting while walking dangerous?",
        "Hi",
        "List three ways to reduce neck strain when reading on a phone.",
        "Can screen time affect mood?",
    ]
]
MAX_NEW = 20


def reference(model, tokenizer, prompt: str) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def swap_steps(engine: Engine, **kwargs) -> DecodeSteps:
    """Give the engine's runner decode steps built with other options (e.g. GPU padding on CPU)."""
    runner = engine.runner
    runner.steps = DecodeSteps(runner.decoder, **kwargs)
    return runner.steps


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def references(engine):
    return [reference(engine.model, engine.tokenizer, p) for p in PROMPTS]


@pytest.mark.parametrize(
    "compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)  # compiling on CPU takes a minute or more
def test_padded_shapes_equal_generate(engine, references, compile):
    """The CUDA shapes (>= 64 matmul rows, power-of-two attention rows >= 2 and context, prefill packed
    and padded to 1024 tokens), eagerly and compiled: padding never changes a row's tokens."""
    steps = swap_steps(engine, padded=True, compile=compile)
    try:
        assert steps.shape(3, 200) == (64, 4, 256)
        assert steps.shape(1, 20) == (64, 2, 128)  # never a 1-row attention: compile would specialise it
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW))
    finally:
        swap_steps(engine)
    assert [c.token_ids for c in results] == references


def test_rows_ending_on_eos_leave_mid_batch(engine, references):
    """A row that ends on an end-of-sequence token has already been given the next decode step (the
    runner launches it before reading the tokens): its extra token is dropped, the others go on exact."""
    runner = engine.runner
    stop = references[0][5]  # an ordinary token made an EOS: the first answer ends at its sixth token
    saved = runner.eos_ids
    runner.eos_ids = saved | {stop}
    try:
        got = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW))]
    finally:
        runner.eos_ids = saved
    expected = [ref[: ref.index(stop) + 1] if stop in ref else ref for ref in references]
    assert got == expected
    assert len(got[0]) <= 6 and max(len(g) for g in got) == MAX_NEW


def test_small_prefill_packs_equal_generate(references):
    """engine.prefill_tokens: prompts up to 48 tokens go in packs padded to 48 (as on a GPU), longer
    ones alone; every answer is still plain `generate`'s."""
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4, prefill_tokens=48))
    try:
        steps = swap_steps(eng, padded=True, prefill_tokens=48)
        lengths = [eng.count_tokens(p) for p in PROMPTS]
        assert min(lengths) <= 48 < max(lengths)
        got = [c.token_ids for c in eng.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW))]
    finally:
        eng.close()
    assert steps.prefill_padding(40) == (48, 64) and steps.prefill_padding(49) == (None, 64)
    assert got == references


def test_cache_grows_with_the_longest_sequence(engine, references):
    decoder = engine.runner.decoder
    assert decoder.cache.capacity <= 256
    long_prompt = build_prompt("Tell me about sleep. " * 60)
    n = engine.count_tokens(long_prompt)
    assert n > 256
    [c] = engine.generate([long_prompt], SamplingParams(max_tokens=MAX_NEW))
    assert decoder.cache.capacity >= n + MAX_NEW - 1
    assert c.token_ids == reference(engine.model, engine.tokenizer, long_prompt)
    [again] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_NEW))
    assert again.token_ids == references[0]


@pytest.fixture(scope="module")
def flipped_adapter(tiny_adapter, tmp_path_factory):
    """A second, different adapter: the tiny adapter with its B matrices negated."""
    import shutil

    folder = tmp_path_factory.mktemp("flipped") / "adapter"
    shutil.copytree(tiny_adapter, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k: (-v if "lora_B" in k else v) for k, v in weights.items()}, folder / "adapter_model.safetensors")
    return folder


def test_adapters_mixed_in_one_step(tiny_adapter, flipped_adapter):
    """Requests for the base and two adapters decoded together give what each gives alone."""
    eng = Engine(EngineConfig(adapters={"tiny": str(tiny_adapter), "flipped": str(flipped_adapter)}, max_batch_size=16))
    try:
        names = ["base", "tiny", "flipped"]
        params = SamplingParams(max_tokens=MAX_NEW)
        alone = {(p, a): eng.generate([p], params, adapter=a)[0].token_ids for p in PROMPTS[:3] for a in names}
        assert alone[(PROMPTS[0], "tiny")] != alone[(PROMPTS[0], "flipped")]
        futures = {}
        requests = []
        for key in alone:
            request = eng.make_request(key[0], params, adapter=key[1])
            future = concurrent.futures.Future()
            request.on_delta = lambda d, f=future: f.set_result(d.completion) if d.completion else None
            futures[key] = future
            requests.append(request)
        for request in requests:  # all queued before the engine thread admits them: one mixed batch
            eng.submit(request)
        together = {key: f.result(timeout=120).token_ids for key, f in futures.items()}
    finally:
        eng.close()
    assert together == alone


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ModelLoadError, match="does not run model_type .gpt2.; it runs llama, mistral"):
        check_supported(model)
