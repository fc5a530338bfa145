"""Put the base model and its adapters in memory, and switch between them per batch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import check_prompt_template, read_training_config, resolve_adapter
from ..config import ModelConfig
from ..model import ModelLoadError, load_base_model, load_tokenizer
from .config import EngineConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_config: ModelConfig
    device: torch.device
    adapters: dict[str, Path] = field(default_factory=dict)
    training_config: dict | None = None
    merged: bool = False
    times: dict[str, float] = field(default_factory=dict)  # seconds: tokenizer, model, adapters


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda but no CUDA device is visible")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """EngineSettings.dtype as a torch dtype: auto is float16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def base_config(cfg: EngineConfig, training_configs: dict[str, dict | None]) -> ModelConfig:
    """The explicit model, else the base recorded by the first adapter's training run."""
    if cfg.model is not None:
        for name, tc in training_configs.items():
            if (
                tc
                and tc.get("model")
                and {k: tc["model"].get(k) for k in ("source", "name")}
                != {
                    "source": cfg.model.source,
                    "name": cfg.model.name,
                }
            ):
                log.warning("adapter %s was trained on %s, serving it on %s", name, tc["model"], cfg.model)
        return cfg.model
    first = next(iter(training_configs))
    tc = training_configs[first]
    if not tc or "model" not in tc:
        raise ModelLoadError(
            f"adapter {first!r} has no training_config.yaml with a model: section (a bare Ray Train checkpoint?); "
            "give the base model explicitly"
        )
    return ModelConfig.model_validate(tc["model"])


def attach_adapters(model, adapters: dict[str, Path], merge: bool):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name, is_trainable=False)
    if merge:
        return model.merge_and_unload()
    return model


def load(cfg: EngineConfig) -> LoadedModel:
    adapters = {name: resolve_adapter(location) for name, location in cfg.adapters.items()}
    training_configs = {name: read_training_config(folder) for name, folder in adapters.items()}
    for name, tc in training_configs.items():
        check_prompt_template(name, tc)
    model_cfg = base_config(cfg, training_configs)
    if cfg.merge_adapter and model_cfg.load_in_4bit:
        raise ModelLoadError("merge_adapter cannot merge into 4-bit weights; turn one of them off")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    marks = [time.perf_counter()]
    tokenizer = load_tokenizer(model_cfg)
    marks.append(time.perf_counter())
    model = load_base_model(model_cfg, dtype, device)
    marks.append(time.perf_counter())
    if adapters:
        model = attach_adapters(model, adapters, cfg.merge_adapter)
    marks.append(time.perf_counter())
    times = {name: end - start for name, start, end in zip(("tokenizer_s", "model_s", "adapters_s"), marks, marks[1:])}
    model.eval()
    first = next(iter(training_configs.values()), None)
    return LoadedModel(model, tokenizer, model_cfg, device, adapters, first, merged=cfg.merge_adapter, times=times)


def context_limit(model, requested: int | None) -> int:
    """Tokens per sequence: the request, else the model's limit capped at DEFAULT_MAX_CONTEXT.

    Also capped at a sliding window, because the engine's cache keeps every token rather than
    evicting those that fall out of the window.
    """
    config = model.config
    limits = [getattr(config, "max_position_embeddings", None), getattr(config, "sliding_window", None)]
    model_limit = min((x for x in limits if x), default=DEFAULT_MAX_CONTEXT)
    if requested is None:
        return min(model_limit, DEFAULT_MAX_CONTEXT)
    if requested > model_limit:
        raise ModelLoadError(f"max_context={requested} is above this model's limit of {model_limit}")
    return requested
