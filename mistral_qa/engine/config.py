"""EngineConfig: what the generation engine loads and how large its batches get."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..config import EngineSettings, ModelConfig

BASE_NAME = "base"


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
