"""BatchJobConfig: what the batch Q&A job reads, how it generates, where it writes.

Built from the shared ModelConfig, the shared sampling schema (`generation`: bounds checked here, before
Ray starts, exactly as the engine checks them) plus sections of its own; every field has a one-line
description and unknown keys are errors. `--input` / `--output` on the command line fill input.path / output.path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mistral_qa.config import ModelConfig, StrictModel
from mistral_qa.engine.config import EngineSettings
from mistral_qa.sampling import SamplingSettings


class InputSettings(StrictModel):
    path: str | None = Field(
        None, description="Question file, folder or glob; local, s3:// or gs:// (--input sets it)."
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "text"] = Field(
        "auto",
        description="auto: by extension (.jsonl/.ndjson, .csv, .parquet, .txt; .gz etc. decompressed); "
        "text: one question a line.",
    )
    question_column: str = Field(
        "question", description="Column (JSONL key, CSV header, Parquet column) holding the question."
    )
    id_column: str | None = Field(
        "id", description="Column holding row ids; rows without one get '<file>:<row>' (stable across reruns)."
    )
    context_column: str | None = Field(
        None, description="Optional column with extra context, passed as the template's input section."
    )


class OutputSettings(StrictModel):
    path: str | None = Field(
        None, description="Output folder for Parquet files; local, s3:// or gs:// (--output sets it)."
    )
    mode: Literal["resume", "overwrite", "error"] = Field(
        "resume",
        description="resume: skip ids already in the output; overwrite: delete earlier answer files first; "
        "error: refuse a non-empty output.",
    )
    rows_per_file: int = Field(
        1000, ge=1, description="Rows gathered into each Parquet file (a killed job loses only rows not yet in a file)."
    )
    retry_failed: bool = Field(
        True,
        description="resume: answer again the rows whose generation failed (generation_failed; they are taken "
        "out of the output first); rows with bad input (unreadable, empty, too long, ...) stay as they are.",
    )
    max_failed_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="The job exits non-zero (3) when more than this fraction of the rows it answered failed in "
        "generation (generation_failed); bad-input rows do not count.",
    )


class ComputeSettings(StrictModel):
    num_actors: int = Field(1, ge=1, description="Generation actors (the pool's minimum size when max_actors is set).")
    max_actors: int | None = Field(
        None, ge=1, description="Autoscale the actor pool up to this size; None: fixed pool."
    )
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs reserved by each generation actor (0 on CPU).")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved by each generation actor.")
    batch_size: int = Field(
        64,
        ge=1,
        description="Rows handed to an actor per call; its engine decodes up to engine.max_batch_size of them at once.",
    )
    calls_per_actor: int = Field(
        2,
        ge=1,
        description="Engine calls running at once on an actor (threads sharing its engine): while one call's "
        "last answers finish, the next call's questions take the freed slots; 1: the slots drain at each call's end.",
    )
    batch_retries: int = Field(
        1,
        ge=0,
        description="Retries of a failing engine batch before it is answered row by row (bad rows get an error).",
    )
    max_errored_blocks: int = Field(
        0, ge=-1, description="Blocks allowed to fail outright (-1: any); their rows are answered on the next run."
    )


class BatchJobConfig(StrictModel):
    model: ModelConfig | None = Field(
        None, description="Base model; None: the base recorded in the adapter's training_config.yaml."
    )
    adapter: str | None = Field(
        None, description="LoRA adapter folder (outputs/<run>/adapter), local or s3:// / gs://."
    )
    input: InputSettings = Field(
        default_factory=InputSettings, description="Where the questions are and how to read them."
    )
    output: OutputSettings = Field(default_factory=OutputSettings, description="Where the answers go.")
    generation: SamplingSettings = Field(
        default_factory=SamplingSettings,
        description="Sampling parameters: the shared schema (mistral_qa/sampling.py) the engine and Serve use.",
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Generation engine in each actor.")
    compute: ComputeSettings = Field(
        default_factory=ComputeSettings, description="Ray Data actor pool and fault tolerance."
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> BatchJobConfig:
        if self.model is None and self.adapter is None:
            raise ValueError("set model, adapter or both (model: null takes the base the adapter was trained on)")
        if self.engine.merge_adapter and self.adapter is None:
            raise ValueError("engine.merge_adapter needs an adapter")
        if self.compute.max_actors is not None and self.compute.max_actors < self.compute.num_actors:
            raise ValueError("compute.max_actors must be at least compute.num_actors")
        if self.engine.device == "cuda" and self.compute.num_gpus_per_actor == 0:
            raise ValueError("engine.device=cuda needs compute.num_gpus_per_actor > 0")
        if self.engine.max_batch_size == "auto" and 0 < self.compute.num_gpus_per_actor < 1:
            # Each actor would size its cache to the whole card's free memory, and the second one on the card fails.
            raise ValueError(
                "engine.max_batch_size=auto sizes the KV cache for a GPU the actor has to itself; with "
                f"compute.num_gpus_per_actor={self.compute.num_gpus_per_actor:g} give engine.max_batch_size a number"
            )
        return self
