"""Model families by list (engine/support.py): every listed model_type answers like `generate` on a
tiny random config, and a look-alike that keeps Llama's module names but not its arithmetic
(Granite) is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from mistral_qa.config import ModelConfig
from mistral_qa.engine import SamplingParams
from mistral_qa.engine.decoder import SlotDecoder
from mistral_qa.engine.request import Request
from mistral_qa.engine.runner import StepRunner
from mistral_qa.engine.support import SUPPORTED_MODEL_TYPES, check_supported
from mistral_qa.engine.textstream import TextStream
from mistral_qa.model import ModelLoadError, load_tokenizer

SHAPE = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SHAPE),  # q/k/v projections with biases
}
PROMPTS = ["Does phone use before bed hurt sleep?", "Hi", "Explain blue light and melatonin in detail, please."]
MAX_NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(source="random", name="tiny-mistral"))


def tiny(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def engine_answers(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """The engine's runner over `model` (no Engine: it loads models by source), stepped to the end."""
    runner = StepRunner(SlotDecoder(model, [], slots=2, slot_len=128), [], 2, 128, {model.config.eos_token_id})
    requests = [
        Request(ids, SamplingParams(max_tokens=MAX_NEW), None, TextStream(tokenizer, []), torch.device("cpu"))
        for ids in prompts
    ]
    for request in requests:
        runner.add(request)
    while runner.has_work():
        runner.step()
    return [r.token_ids for r in requests]


def test_every_listed_family_has_a_parity_test():
    assert set(CONFIGS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_listed_family_equals_generate(model_type, tokenizer):
    model = tiny(CONFIGS[model_type]())
    assert model.config.model_type == model_type
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)
        expected.append(out[0, len(ids) :].tolist())
    assert engine_answers(model, tokenizer, prompts) == expected


def test_granite_is_refused_by_name():
    """Granite keeps Llama's module names but scales embeddings, residuals and logits: the engine's
    wiring would answer wrongly, so it is refused, and the message lists what runs."""
    model = tiny(GraniteConfig(**SHAPE, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0))
    with pytest.raises(ModelLoadError, match="model_type 'granite'; it runs llama, mistral, qwen2"):
        check_supported(model)
    with pytest.raises(ModelLoadError, match="granite"):
        SlotDecoder(model, [], slots=1, slot_len=16)
