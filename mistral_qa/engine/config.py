"""The engine's settings: EngineSettings (how it runs; serve and batch share them) and EngineConfig
(those plus what it loads: the base model and adapters)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..config import ModelConfig, StrictModel

BASE_NAME = "base"


class EngineSettings(StrictModel):
    """How the generation engine runs (serve and batch share these; EngineConfig adds what it loads)."""

    merge_adapter: bool = Field(
        False, description="With exactly one adapter: merge it into the base weights (faster; base no longer served)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights and activations; auto: float16 on CUDA, float32 on CPU."
    )
    max_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        32,
        description="Most sequences decoded together in one step (each holds a KV cache slot of max_context "
        "tokens). auto: on CUDA the most slots, a power of two up to 512, whose cache fits in the memory left "
        "free by the model less a tenth of the card (for a card the engine has to itself); on CPU 32.",
    )
    max_context: int | None = Field(
        None, ge=16, description="Prompt + answer tokens per sequence; None: the model's limit, capped at 4096."
    )
    compile: bool = Field(
        True, description="CUDA: torch.compile the decode step's layer (fused kernels); false: plain PyTorch ops."
    )
    prefill_tokens: int = Field(
        1024,
        ge=16,
        description="Prompts are prefilled packed, up to this many tokens a forward (on CUDA padded to exactly "
        "this many, so an answer does not depend on its batch-mates); a longer prompt is prefilled in chunks of "
        "this many tokens, one a step, with running streams decoding between chunks. Smaller: a lone prompt's first "
        "token comes sooner and long prompts stall others less; larger: fewer forwards when many prompts arrive.",
    )
    decode_attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto",
        description="Decode attention: sdpa reads every row's cache up to the batch's longest row (on CUDA its "
        "power-of-two bucket); flex (FlexAttention, a block mask) reads only the 128-token blocks each row has "
        "filled, and needs compile to be fast; auto: flex on CUDA with compile, else sdpa.",
    )
    compile_cache: str | None = Field(
        None,
        description="A folder (local, or an s3:// / gs:// URI; shared storage suits) for torch.compile's "
        "artifacts: the first engine saves what its warm-up compiled, later ones (the batch job's actors, "
        "serve replicas) load it and start warm; keyed on torch, device, model and shape settings; None: off.",
    )


class EngineConfig(EngineSettings):
    model: ModelConfig | None = Field(
        None, description="Base model; None: the `model:` section of the first adapter's training_config.yaml."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Served name -> adapter location: outputs/<run>/adapter, a Ray Train checkpoint folder, "
        "or an s3:// / gs:// URI of either.",
    )

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.model is None and not self.adapters:
            raise ValueError("give model:, adapters:, or both (the base is read from the first adapter)")
        if self.merge_adapter and len(self.adapters) != 1:
            raise ValueError(f"merge_adapter needs exactly one adapter, got {len(self.adapters)}")
        if BASE_NAME in self.adapters:
            raise ValueError(f"{BASE_NAME!r} names the base model; give the adapter another name")
        return self
