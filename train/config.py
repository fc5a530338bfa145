"""TrainJobConfig: what the training job reads (python -m train --config train/configs/<name>.yaml).

Built from the shared ModelConfig and LoraSettings (mistral_qa.config) plus the sections only training
uses: data, optimiser, loop, scaling, run and tracking. Every field has a one-line description and
unknown keys are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mistral_qa.config import LoraSettings, ModelConfig, StrictModel


class DataConfig(StrictModel):
    source: str = Field(
        "tatsu-lab/alpaca",
        description="Hub dataset id, or a local .json/.jsonl/.parquet file of Alpaca rows (instruction, input, "
        "output), OpenAI messages rows or ShareGPT conversations rows. 'builtin:mobile_health' is the project's own set.",
    )
    template: Literal["alpaca", "chat"] = Field(
        "alpaca",
        description="Prompt template: alpaca (### Instruction/### Response text) or chat (the tokenizer's own chat "
        "template; the model must carry one). Recorded with the adapter; serve and batch answer with it.",
    )
    eval_size: int = Field(200, ge=1, description="Rows held out for evaluation (deterministic by split_seed).")
    split_seed: int = Field(42, description="Seed of the train/eval split.")
    max_length: int = Field(
        512, ge=16, description="Rows whose tokenised prompt+response is longer are dropped and counted."
    )
    loss_on: Literal["response", "all"] = Field(
        "response",
        description="Compute the loss on the assistant answers only (every assistant turn with chat), or on the "
        "whole sequence.",
    )
    max_rows: int | None = Field(None, ge=1, description="Use at most this many rows (before the split).")


class OptimizerConfig(StrictModel):
    name: Literal["paged_adamw_32bit", "adamw_torch"] = Field("paged_adamw_32bit", description="Optimiser.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class DeepSpeedConfig(StrictModel):
    stage: Literal[2, 3] = Field(2, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Offload optimiser state to CPU memory.")


class TrainingConfig(StrictModel):
    max_steps: int = Field(2000, ge=1, description="Optimiser steps in the whole run.")
    batch_size: int = Field(4, ge=1, description="Rows per worker per micro-batch (and per eval micro-batch).")
    batch_tokens: int | None = Field(
        None,
        ge=16,
        description="Length-grouped training micro-batches of at most this many padded tokens (rows x longest) "
        "per worker, instead of batch_size rows; None: batch_size rows.",
    )
    group_by_length: bool = Field(
        False,
        description="batch_size rows per micro-batch as usual, but length-grouped within megabatches (as "
        "transformers' group_by_length): the reference's rows per step with little padding. Not with batch_tokens.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    eval_every: int = Field(100, ge=1, description="Evaluate and checkpoint every N steps (and at the end).")
    eval_batches: int | None = Field(
        None, ge=1, description="Cap on eval micro-batches per worker (None: the whole eval split)."
    )
    log_every: int = Field(10, ge=1, description="Print a progress line every N steps.")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="auto: fp16 mixed precision on CUDA, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (fused elementwise ops; the first steps compile)."
    )
    cudnn_attention: bool = Field(
        False,
        description="CUDA: let PyTorch pick cuDNN's attention kernels (its first choice on Hopper), which build "
        "a plan for every new batch shape; false: flash / memory-efficient attention, no per-shape cost.",
    )
    seed: int = Field(1234, description="Seed for LoRA init, dropout and data order.")
    deepspeed: DeepSpeedConfig | None = Field(None, description="Use DeepSpeed ZeRO instead of DDP (CPU: fp32 only).")


class ScalingSettings(StrictModel):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU when use_gpu).")
    use_gpu: bool = Field(False, description="Give each worker one GPU.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )


class RunSettings(StrictModel):
    name: str = Field(
        "run",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Run name: one plain folder name (letters, digits, '.', '_', '-'; not '.' or '..'); "
        "re-running the same name resumes.",
    )
    storage_path: str = Field(
        "outputs/ray", description="Ray Train storage (local folder, s3:// or gs://) for checkpoints."
    )
    output_dir: str = Field("outputs", description="Folder for the final adapter, metrics and plot (output_dir/name).")
    num_to_keep: int | None = Field(2, ge=1, description="Checkpoints kept (None: all).")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited).")
    fail_at_step: int | None = Field(
        None, ge=1, description="Testing aid: rank 1 (or 0) raises once at this step of a fresh start."
    )

    # The name becomes a folder under run.output_dir and run.storage_path: '.' and '..' would put the
    # run's outputs in (or above) those folders themselves.
    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, value: str) -> str:
        if value in (".", ".."):
            raise ValueError(f"{value!r} is not a folder name of its own; give a plain name such as 'my-run'")
        return value


class MlflowSettings(StrictModel):
    uri: str = Field(
        description="Tracking URI: http(s)://host:port of an MLflow server (credentials from MLFLOW_TRACKING_* "
        "environment variables only), or a local folder / sqlite:/// store."
    )
    experiment: str = Field("mistral-qa", min_length=1, description="MLflow experiment (created when missing).")


class TensorBoardSettings(StrictModel):
    log_dir: str = Field(description="Folder for event files; each run writes to log_dir/<run.name>.")


class WandbSettings(StrictModel):
    project: str = Field("mistral-qa", min_length=1, description="W&B project name.")
    mode: Literal["offline"] = Field(
        "offline", description="offline only: runs are written under dir and uploaded later with `wandb sync`."
    )
    dir: str = Field("outputs/wandb", description="Folder for W&B's offline run files (dir/wandb/offline-run-*).")


class TrackingConfig(StrictModel):
    mlflow: MlflowSettings | None = Field(None, description="Log to MLflow (None: off).")
    tensorboard: TensorBoardSettings | None = Field(None, description="Write TensorBoard event files (None: off).")
    wandb: WandbSettings | None = Field(None, description="Log to Weights & Biases, offline (None: off).")
    required: bool = Field(
        True,
        description="true: a tracking backend unreachable at start fails the run before training; false: "
        "warn that tracking is off for it and train without it.",
    )


class TrainJobConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    optim: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimiser and schedule.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Loop settings.")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="Ray Train workers.")
    run: RunSettings = Field(default_factory=RunSettings, description="Names, storage and fault tolerance.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking: MLflow, TensorBoard, W&B (several at once)."
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainJobConfig:
        # DeepSpeed also runs on CPU (its CPU accelerator, gloo); only its fp16/bf16 need CUDA, which the
        # precision check below covers. ZeRO-Offload's CPU Adam is a C++ op DeepSpeed compiles at first use.
        if self.model.load_in_4bit and not self.scaling.use_gpu:
            raise ValueError("model.load_in_4bit needs scaling.use_gpu=true (bitsandbytes 4-bit runs on CUDA)")
        if self.training.precision in ("fp16", "bf16") and not self.scaling.use_gpu:
            raise ValueError(
                f"training.precision={self.training.precision} needs scaling.use_gpu=true; use auto or fp32 on CPU"
            )
        if self.training.batch_tokens is not None and self.training.batch_tokens < self.data.max_length:
            raise ValueError("training.batch_tokens must be at least data.max_length, so that every row fits")
        if self.training.group_by_length and self.training.batch_tokens is not None:
            raise ValueError("training.group_by_length and training.batch_tokens are two batch layouts; set one")
        if self.training.compile and self.training.deepspeed is not None:
            raise ValueError("training.compile is not supported with training.deepspeed (untested); use DDP")
        if self.optim.warmup_steps >= self.training.max_steps:
            raise ValueError("optim.warmup_steps must be smaller than training.max_steps")
        return self
