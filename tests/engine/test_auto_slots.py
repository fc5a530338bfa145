"""engine.max_batch_size=auto: as many KV cache slots as the card holds, a power of two up to 512.
The sizing arithmetic with the memory of real cards, the setting's validation, and an engine built
with it (CPU here: 32 slots; the GPU test in test_gpu_engine.py checks a card)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.kv_cache import AUTO_CPU_SLOTS, AUTO_MAX_SLOTS, auto_slots, fit_slots, slot_bytes
from mistral_qa.model import ModelLoadError

GIB = 2**30
# Mistral-7B: 32 layers, 8 KV heads of 128, fp16: 128 KiB of keys and values per token.
MISTRAL_SLOT = slot_bytes(32, 8, 128, torch.float16, 1024)


def test_a_mistral_7b_slot_of_1024_tokens_is_128_mib():
    assert MISTRAL_SLOT == 128 * 2**20


@pytest.mark.parametrize(
    "card, total_gib, free_gib, slots",
    [
        # free = the card less the 7B's 13.5 GiB of fp16 weights and ~1 GiB of CUDA context
        ("H200 141 GB", 139.8, 125.0, 512),  # (125 - 14.0) / 0.125 = 888 slots fit: capped at 512
        ("H100 80 GB", 79.2, 64.5, 256),  # (64.5 - 7.9) / 0.125 = 452: the power of two below
        ("A10 24 GB", 22.0, 8.0, 32),  # (8.0 - 2.2) / 0.125 = 46
    ],
)
def test_fit_slots_on_real_cards(card, total_gib, free_gib, slots):
    assert fit_slots(int(free_gib * GIB), int(total_gib * GIB), MISTRAL_SLOT) == slots, card


def test_fit_slots_is_a_power_of_two_never_above_the_cap_and_zero_when_nothing_fits():
    total = 80 * GIB
    for free_gib in range(9, 80):
        n = fit_slots(free_gib * GIB, total, MISTRAL_SLOT)
        assert n & (n - 1) == 0 and 1 <= n <= AUTO_MAX_SLOTS
        assert n * MISTRAL_SLOT <= free_gib * GIB - 0.1 * total  # the cache leaves the headroom free
    assert fit_slots(8 * GIB, total, MISTRAL_SLOT) == 0  # 8 GiB free < 10% of 80: no room at all
    assert fit_slots(int(8.1 * GIB), total, MISTRAL_SLOT) == 0  # room for less than one slot


def test_the_setting_takes_auto_or_a_positive_count_and_names_itself_otherwise():
    assert EngineConfig(model=ModelConfig(source="random", name="tiny-mistral"), max_batch_size="auto")
    for bad in ("big", 0, -4):
        with pytest.raises(ValidationError, match="max_batch_size"):
            EngineConfig(model=ModelConfig(source="random", name="tiny-mistral"), max_batch_size=bad)


def test_auto_on_cpu_is_the_cpu_default_and_the_engine_answers():
    eng = Engine(
        EngineConfig(model=ModelConfig(source="random", name="tiny-mistral"), device="cpu", max_batch_size="auto")
    )
    try:
        assert eng.max_batch_size == AUTO_CPU_SLOTS == eng.runner.max_batch_size
        assert eng.runner.decoder.cache.slots == AUTO_CPU_SLOTS
        out = eng.generate(["Hi"] * 3, SamplingParams(max_tokens=3, temperature=0.0))
        assert [len(c.token_ids) for c in out] == [3, 3, 3]
    finally:
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.gpu
def test_auto_refuses_a_context_that_leaves_no_slot():
    with pytest.raises(ModelLoadError, match="max_context"):  # 4,096 layers x 64 KV heads x 2^20 tokens: 128 TiB
        auto_slots(4096, 64, 128, torch.float16, torch.device("cuda"), 1 << 20)
