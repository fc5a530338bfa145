"""Build the Ray Train TorchTrainer from a TrainJobConfig, run it, and write the run's outputs.

outputs/<run>/adapter/          adapter_model.safetensors, adapter_config.json, tokenizer,
                                training_config.yaml (base model + prompt template for serving)
outputs/<run>/config.yaml       the resolved config
outputs/<run>/metrics.jsonl     one line per step (train loss, lr, tok/s, memory; eval loss at evals)
outputs/<run>/loss_curve.png
With tracking: configured, the run is also logged to MLflow / TensorBoard / W&B (train/tracking.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mistral_qa.configio import dump_config
from mistral_qa.local_ray import start_ray
from mistral_qa.model import load_tokenizer
from mistral_qa.preflight import PreflightError, absolute, require_gpus

from .checkpoint import ADAPTER_DIR, read_history
from .config import TrainJobConfig
from .loop import train_loop_per_worker
from .optim import check_optimizer
from .prepare import prepare_data
from .report import plot_losses, write_metrics
from .tracking import IDS_KEY, TrackingError, finish_runs, open_runs

log = logging.getLogger("train")


def check_resources(cfg: TrainJobConfig) -> None:
    if cfg.scaling.use_gpu:
        require_gpus(
            cfg.scaling.num_workers,
            f"scaling.use_gpu=true with scaling.num_workers={cfg.scaling.num_workers}",
            "train/configs/quickstart.yaml",
        )


def check_data(cfg: TrainJobConfig, tokenizer) -> None:
    """Read, check, split and tokenise the data here as every worker will (the same prepare_data), so
    a data problem fails once, before Ray Train starts: inside it, each restart (run.max_failures)
    would fail the same way again."""
    _, _, report = prepare_data(cfg.data, tokenizer)
    log.info("data %s: %s", cfg.data.source, report.summary())


def with_absolute_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """Workers run in their own folders: hand them absolute paths for local data and model folders."""
    cfg = cfg.model_copy(deep=True)
    if Path(cfg.data.source).expanduser().exists():
        cfg.data.source = absolute(cfg.data.source)
    if cfg.model.source == "local":
        cfg.model.name = absolute(cfg.model.name)
    if cfg.tracking.tensorboard is not None:
        cfg.tracking.tensorboard.log_dir = absolute(cfg.tracking.tensorboard.log_dir)
    if cfg.tracking.wandb is not None:
        cfg.tracking.wandb.dir = absolute(cfg.tracking.wandb.dir)
    return cfg


def run_folder(cfg: TrainJobConfig) -> str:
    """Ray Train's folder of this run (checkpoints); the tracked-run ids are kept beside them."""
    return f"{absolute(cfg.run.storage_path).rstrip('/')}/{cfg.run.name}"


def build_trainer(cfg: TrainJobConfig, tracking_ids: dict | None = None) -> TorchTrainer:
    cfg = with_absolute_paths(cfg)
    scaling = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.model_dump(mode="json"), IDS_KEY: tracking_ids or {}},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=absolute(cfg.run.storage_path),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        ),
    )


def write_outputs(cfg: TrainJobConfig, checkpoint_dir: Path, tokenizer) -> Path:
    out = Path(absolute(cfg.run.output_dir)) / cfg.run.name
    adapter = out / ADAPTER_DIR
    if adapter.exists():
        shutil.rmtree(adapter)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint_dir / ADAPTER_DIR, adapter)
    tokenizer.save_pretrained(adapter)
    resolved = dump_config(cfg)
    (out / "config.yaml").write_text(resolved)
    (adapter / "training_config.yaml").write_text(f"prompt_template: {cfg.data.template}\n{resolved}")
    history = read_history(checkpoint_dir)
    write_metrics(history, out / "metrics.jsonl")
    plot_losses(history, out / "loss_curve.png", f"{cfg.run.name}: {cfg.model.name}")
    return out


def start_tracking(cfg: TrainJobConfig) -> tuple[TrainJobConfig, dict]:
    """Reach the tracking backends before anything slow starts (seconds; a dead server is an error
    naming its key, or with tracking.required=false a warning); returns the config the workers get."""
    try:
        tracking, ids = open_runs(cfg, run_folder(cfg))
    except TrackingError as err:
        raise PreflightError(str(err)) from None
    return cfg.model_copy(update={"tracking": tracking}), ids


def run_training(cfg: TrainJobConfig) -> Path:
    """Run (or resume) the training described by cfg; returns the run's output folder."""
    check_optimizer(cfg.optim)  # an optimiser whose extra is not installed: one line, before any work
    worker_cfg, tracking_ids = start_tracking(cfg)
    out = None
    try:
        tokenizer = load_tokenizer(cfg.model)  # fails fast (hub unreachable, missing package) before Ray work
        check_data(cfg, tokenizer)
        start_ray()  # a local Ray, when it starts one, ends with this driver however it ends
        check_resources(cfg)
        result = build_trainer(worker_cfg, tracking_ids).fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            out = write_outputs(cfg, Path(folder), tokenizer)
        return out
    finally:
        finish_runs(worker_cfg.tracking, tracking_ids, out)
