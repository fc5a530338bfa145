"""engine.decode_attention=flex (FlexAttention with a block mask per row) against SDPA and plain
`generate`, on the CPU: rows at very different positions, across and on block boundaries, so that
each row's own number of KV blocks matters. The CPU's eager flex is PyTorch's reference version; the
compiled one is inductor's C++ kernel (on CUDA: its Triton flex-decoding kernel)."""

from __future__ import annotations

import pytest
import torch

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.attention import FLEX_BLOCK, flex_mask
from mistral_qa.engine.decoder import SlotDecoder
from mistral_qa.engine.graphs import DecodeSteps
from mistral_qa.model import load_base_model
from mistral_qa.prompt import build_prompt

TINY = ModelConfig(source="random", name="tiny-mistral")
# Positions of the decoded rows: one block, block boundaries, several blocks, the cache's last column.
POSITIONS = [3, FLEX_BLOCK - 1, FLEX_BLOCK, 2 * FLEX_BLOCK + 44, 0, 599]
MAX_NEW = 20


@pytest.fixture(scope="module")
def model():
    return load_base_model(TINY, torch.float32).eval()


@pytest.fixture(scope="module")
def decoder(model) -> SlotDecoder:
    """Eight slots of 600 columns (not a whole number of blocks), the cache filled at random."""
    decoder = SlotDecoder(model, [], slots=8, slot_len=600)
    decoder.cache.reserve(600)
    generator = torch.Generator().manual_seed(0)
    for cache in (*decoder.cache.keys, *decoder.cache.values):
        cache.copy_(torch.randn(cache.shape, generator=generator))
    return decoder


def test_flex_mask_reads_each_rows_blocks():
    """Eager flex applies only the mask_mod (every column); the blocks are what compiled kernels skip by."""
    mask = flex_mask(torch.tensor(POSITIONS), slots=8, columns=600)
    assert mask.kv_num_blocks.flatten().tolist() == [1, 1, 2, 3, 1, 5, 0, 0]
    assert mask.shape == (8, 1, 1, 600)


@pytest.mark.parametrize(
    "compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)  # compiling takes half a minute on a small CPU
def test_flex_decode_equals_sdpa(decoder, compile):
    """Six rows (of seven matmul rows, the last padding) at very different positions: flex's logits
    are SDPA's over the longest row's context."""
    ids = torch.arange(10, 17)
    positions = torch.tensor([*POSITIONS, 0])
    adapters = torch.full((7,), -1)
    rows, context = len(POSITIONS), max(POSITIONS) + 1
    decoder.attention = "sdpa"
    expected = decoder.decode(ids, positions, adapters, rows, context)[:rows]
    decoder.attention = "flex"
    if compile:
        decoder.compile()
    got = decoder.decode(ids, positions, adapters, rows, context)[:rows]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unknown_attention_is_refused(model):
    with pytest.raises(ValueError, match="choose one of sdpa, flex"):
        SlotDecoder(model, [], slots=1, slot_len=16, attention="flash")


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model=TINY, max_batch_size=4, decode_attention="flex"))
    yield eng
    eng.close()


def test_flex_engine_equals_generate(engine):
    """A prompt of several blocks decoded with short ones, in exact and in CUDA-padded shapes (64 matmul
    rows, power-of-two attention rows): every answer is plain `generate`'s."""
    prompts = [build_prompt(q) for q in ["Hi", "Tell me about sleep. " * 60, "Is texting while walking dangerous?"]]
    assert engine.count_tokens(prompts[1]) > 2 * FLEX_BLOCK > 4 * engine.count_tokens(prompts[2])
    model, tokenizer = engine.model, engine.tokenizer
    expected = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        expected.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    runner = engine.runner
    params = SamplingParams(max_tokens=MAX_NEW)
    exact = [c.token_ids for c in engine.generate(prompts, params)]
    runner.steps = DecodeSteps(runner.decoder, padded=True)
    try:
        padded = [c.token_ids for c in engine.generate(prompts, params)]
    finally:
        runner.steps = DecodeSteps(runner.decoder)
    assert exact == expected and padded == expected


def test_auto_attention_is_flex_only_where_it_runs_compiled(engine):
    """auto: flex on CUDA with compile (its fast kernel); sdpa on CPU or uncompiled (flex's reference path)."""
    from types import SimpleNamespace

    from mistral_qa.engine.core import decode_attention

    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    auto = EngineConfig(model=TINY)
    assert auto.decode_attention == "auto"
    assert decode_attention(auto, cuda) == "flex" and decode_attention(auto, cpu) == "sdpa"
    assert decode_attention(EngineConfig(model=TINY, compile=False), cuda) == "sdpa"
    assert decode_attention(EngineConfig(model=TINY, decode_attention="flex"), cpu) == "flex"
    assert engine.runner.decoder.attention == "flex"
