"""Full training state in a Ray Train checkpoint: adapter, optimiser, scheduler, scaler, step, history.

Layout of a checkpoint folder:
    adapter/            PEFT adapter (adapter_model.safetensors + adapter_config.json)
    trainer_state.pt    optimiser, scheduler and grad-scaler state, step, metrics history
    rng.json            the data/dropout position (step) and seed; randomness per step is derived from them
Dropout randomness and data order are pure functions of (seed, step, rank), so the step number is
the whole RNG and data position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .step import CausalLMLoss

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


def unwrap(model):
    """The PEFT model inside a DDP / DeepSpeed wrapper and the training loss (train/step.py)."""
    model = getattr(model, "module", model)
    return model.peft_model if isinstance(model, CausalLMLoss) else model


def save_state(folder: Path, model, optimizer, scheduler, scaler, step: int, seed: int, history: list[dict]) -> None:
    folder = Path(folder)
    unwrap(model).save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
    write_trainer_state(folder, state, step, seed, history)


def write_trainer_state(folder: Path, state: dict, step: int, seed: int, history: list[dict]) -> None:
    """trainer_state.pt (state + step + history) and rng.json: the parts every checkpoint layout shares."""
    torch.save({**state, "step": step, "history": history}, folder / STATE_FILE)
    (folder / "rng.json").write_text(json.dumps({"step": step, "seed": seed}))


def load_state(folder: Path, model, optimizer, scheduler, scaler) -> tuple[int, list[dict]]:
    """Restore everything saved by save_state; returns (step, metrics history)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(unwrap(model), weights)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint adapter does not fit this model: {result.unexpected_keys[:5]}")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"]), list(state["history"])


def read_history(folder: Path) -> list[dict]:
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return list(state["history"])
