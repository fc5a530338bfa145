"""Random LoRA adapters made on the spot (no training run), laid out as `python -m train` writes them,
and what they cost the engine: merged vs the bare base, one adapter unmerged, two mixed in a batch."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
import yaml

from mistral_qa.config import LoraSettings, ModelConfig
from mistral_qa.engine import Engine, EngineConfig
from mistral_qa.model import RANDOM_SHAPES
from mistral_qa.prompt import TEMPLATE_NAME

from .engine_runs import batch_run
from .gpu import free_memory

B_STD = 0.02  # random non-zero B: the adapter visibly changes answers (a fresh LoRA has B = 0)


def make_random_adapter(folder: Path, model_cfg: ModelConfig, seed: int, lora: LoraSettings | None = None) -> Path:
    """adapter_model.safetensors + adapter_config.json + training_config.yaml in `folder`.

    The base is built on the meta device (no memory); only the LoRA matrices get values.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    lora = lora or LoraSettings()
    config = MistralConfig(**RANDOM_SHAPES[model_cfg.name], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.device("meta"):
        base = MistralForCausalLM(config)
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, peft_config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        owner, _, attr = name.rpartition(".")
        scale = B_STD if ".lora_B." in name else 1 / math.sqrt(param.shape[1])
        values = torch.randn(param.shape, generator=gen) * scale
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(values, requires_grad=False))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    training = {"prompt_template": TEMPLATE_NAME, "model": model_cfg.model_dump(), "lora": lora.model_dump()}
    (folder / "training_config.yaml").write_text(yaml.safe_dump(training, sort_keys=False))
    return folder


def _measure(
    engine_cfg: EngineConfig, runs: dict[str, list[tuple[str, str | None]]], max_tokens: int, repeats: int, log
) -> dict:
    """tok/s of each named batch on one engine: the median of `repeats` timed runs after a warm-up
    run (one batch is a few seconds on a GPU: a single timing swung by +-15% between runs)."""
    engine = Engine(engine_cfg)
    out: dict = {}
    try:
        for label, items in runs.items():
            timings = [batch_run(engine, items, max_tokens, warmup=i == 0) for i in range(max(repeats, 1))]
            rates = [stats["tok_s"] for stats, _ in timings]
            stats, timed = timings[-1]
            out[label] = {
                **stats,
                "tok_s": statistics.median(rates),
                "tok_s_runs": rates,
                "token_ids": [t.completion.token_ids for t in timed],
            }
            log(f"adapters {label}: {out[label]['tok_s']:.1f} tok/s (runs: {', '.join(f'{r:.0f}' for r in rates)})")
    finally:
        engine.close()
        del engine
        free_memory()  # before the next engine loads: two 7B copies at once would inflate the peak
    return out


def _pct(new: float, old: float) -> float:
    return (new / old - 1) * 100


def run_adapter_costs(
    base_cfg: EngineConfig, prompts: list[str], batch: int, max_tokens: int, repeats: int, folder: Path, log
):
    """Base vs merged adapter vs unmerged adapter vs two adapters mixed, on `batch` requests each
    (tok/s: the median of `repeats` timed runs)."""
    model_cfg = base_cfg.model
    paths = {name: str(make_random_adapter(folder / name, model_cfg, seed)) for name, seed in (("a", 1), ("b", 2))}
    cycled = [prompts[i % len(prompts)] for i in range(batch)]

    def only(adapter: str | None) -> list[tuple[str, str | None]]:
        return [(p, adapter) for p in cycled]

    mixed = [(p, "a" if i % 2 == 0 else "b") for i, p in enumerate(cycled)]
    bare = _measure(base_cfg, {"base": only(None)}, max_tokens, repeats, log)
    lora_cfg = base_cfg.model_copy(update={"adapters": paths})
    unmerged = _measure(
        lora_cfg, {"a": only("a"), "a+b mixed": mixed, "base rows": only(None)}, max_tokens, repeats, log
    )
    merged_cfg = base_cfg.model_copy(update={"adapters": {"a": paths["a"]}, "merge_adapter": True})
    merged = _measure(merged_cfg, {"a merged": only("a")}, max_tokens, repeats, log)
    runs = {**bare, **unmerged, **merged}
    a_rows = range(0, batch, 2)  # the rows on adapter a in the mixed batch
    checks = {
        "mixed_a_rows_equal_all_a": sum(runs["a+b mixed"]["token_ids"][i] == runs["a"]["token_ids"][i] for i in a_rows),
        "mixed_a_rows": len(a_rows),
        "adapter_changes_answers": sum(x != y for x, y in zip(runs["a"]["token_ids"], runs["base"]["token_ids"])),
    }
    tok_s = {label: r["tok_s"] for label, r in runs.items()}
    return {
        "batch": batch,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "runs": {label: {k: v for k, v in r.items() if k != "token_ids"} for label, r in runs.items()},
        "merged_vs_base_pct": _pct(tok_s["a merged"], tok_s["base"]),
        "unmerged_vs_base_pct": _pct(tok_s["a"], tok_s["base"]),
        "mixed_vs_single_adapter_pct": _pct(tok_s["a+b mixed"], tok_s["a"]),
        "checks": checks,
    }
