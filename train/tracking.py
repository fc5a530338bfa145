"""Experiment tracking: MLflow, TensorBoard and W&B (offline), several at once, behind one interface.

Who does what:
    driver (launch.py), before Ray Train starts: `open_runs` checks that MLflow answers (seconds, never a
        hang), creates or re-opens the tracked runs and keeps their ids in <storage>/<run.name>/tracking.json,
        so that re-running the same run.name continues the same tracked runs;
    rank 0 (loop.py): `open_trackers` -> `Trackers.log` once per step (train loss, lr, tokens/s, peak
        memory; eval loss at evals);
    driver, after training: `finish_runs` logs the loss-curve PNG, adapter, metrics and config as MLflow
        artefacts and closes the MLflow run.
Each backend is imported only when configured. Secrets (MLFLOW_TRACKING_* , WANDB_API_KEY) come from the
environment only and are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from .config import TrackingConfig, TrainJobConfig

log = logging.getLogger("train")

IDS_KEY = "tracking_ids"  # the train_loop_config key that carries the resolved ids to the workers
IDS_FILE = "tracking.json"
PROBE_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """A configured tracking backend cannot be used; the message names its config key."""


def quick_mlflow_http() -> None:
    """MLflow's defaults (120 s timeout, 7 retries with backoff) turn a dead server into minutes of
    waiting; keep each request short unless the user set these themselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


def redact(uri: str) -> str:
    """The URI without user:password@, for messages."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def flat_params(cfg: TrainJobConfig) -> dict[str, str]:
    """The resolved config as MLflow params ("training.max_steps": "10"); tracking itself is left out."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)

    walk("", cfg.model_dump(mode="json", exclude={"tracking"}))
    return out


# ---- driver: reachability, run ids, artefacts ----------------------------------------------------


def _probe_http(uri: str) -> None:
    """Any HTTP answer counts (auth problems surface on the first API call); no answer is an error."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as err:
        reason = type(err).__name__ + (": connection refused" if "refused" in str(err).lower() else "")
        raise TrackingError(f"tracking.mlflow.uri={redact(uri)}: no MLflow server answers ({reason})") from None


def _open_mlflow_run(cfg: TrainJobConfig, run_id: str | None) -> str:
    """Create the MLflow run (params = the resolved config), or re-open run_id when resuming."""
    settings = cfg.tracking.mlflow
    if settings.uri.startswith(("http://", "https://")):
        _probe_http(settings.uri)  # before importing mlflow (seconds on a busy machine)
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.uri)
    try:
        params = flat_params(cfg)
        if run_id is not None:
            logged = client.get_run(run_id).data.params
            client.update_run(run_id, status="RUNNING")
            # MLflow params are write-once: a resumed run records what changed (e.g. max_steps) as tags.
            changed = {f"resumed.{k}": v for k, v in params.items() if logged.get(k) != v}
            for key, value in changed.items():
                client.set_tag(run_id, key, value)
            return run_id
        experiment = client.get_experiment_by_name(settings.experiment)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
        run_id = client.create_run(exp_id, run_name=cfg.run.name).info.run_id
        items = list(params.items())
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        return run_id
    except Exception as err:  # MlflowException, connection and auth errors alike
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(f"tracking.mlflow.uri={redact(settings.uri)}: {first}") from None


def _read_ids(fs, path: str) -> dict:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _write_ids(fs, folder: str, ids: dict) -> None:
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{IDS_FILE}") as f:
        f.write(json.dumps(ids, indent=1).encode())


def open_runs(cfg: TrainJobConfig, run_folder: str) -> tuple[TrackingConfig, dict]:
    """Check the backends and resolve the tracked-run ids (kept in run_folder/tracking.json, the Ray Train
    folder of this run, so they live and die with its checkpoints). Returns the tracking config to use
    (an unreachable backend dropped when tracking.required=false) and the ids for the workers."""
    import pyarrow.fs as pafs

    tracking = cfg.tracking
    if tracking.mlflow is None and tracking.wandb is None:
        return tracking, {}  # TensorBoard needs no id: its log_dir/<run.name> folder is the run
    fs, folder = pafs.FileSystem.from_uri(run_folder)
    ids = _read_ids(fs, f"{folder}/{IDS_FILE}")
    if tracking.mlflow is not None:
        quick_mlflow_http()
        try:
            ids["mlflow"] = _open_mlflow_run(cfg, ids.get("mlflow"))
        except TrackingError as err:
            if tracking.required:
                raise
            log.warning("%s; tracking is off for MLflow (tracking.required=false)", err)
            tracking = tracking.model_copy(update={"mlflow": None})
    if tracking.wandb is not None:
        ids.setdefault("wandb", uuid.uuid4().hex[:8])  # offline: nothing to reach; the id ties resumes together
    _write_ids(fs, folder, ids)
    return tracking, ids


def finish_runs(tracking: TrackingConfig, ids: dict, out: Path | None) -> None:
    """Log the run's files as MLflow artefacts (out=None: training failed) and close the MLflow run.
    A failure here is logged, not raised: the adapter is already written."""
    if tracking.mlflow is None or "mlflow" not in ids:
        return
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(tracking_uri=tracking.mlflow.uri), ids["mlflow"]
    try:
        if out is not None:
            for name in ("loss_curve.png", "metrics.jsonl", "config.yaml"):
                if (out / name).is_file():
                    client.log_artifact(run_id, str(out / name))
            client.log_artifacts(run_id, str(out / "adapter"), artifact_path="adapter")
        client.set_terminated(run_id, "FINISHED" if out is not None else "FAILED")
    except Exception as err:
        log.error("tracking: MLflow run %s not completed (%s); the outputs are in %s", run_id, err, out)


# ---- rank 0: one tracker per backend --------------------------------------------------------------


class Tracker(Protocol):
    name: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class MlflowTracker:
    name = "mlflow"

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        quick_mlflow_http()
        self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        pass  # the driver closes the run once the artefacts are logged


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: str, run_name: str, config_text: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: after a restart, TensorBoard hides what an earlier attempt wrote from first_step on
        # (steps replayed from the last checkpoint), so every step shows once.
        self.writer = SummaryWriter(str(Path(log_dir) / run_name), purge_step=first_step if first_step > 1 else None)
        if first_step == 1:
            self.writer.add_text("config", f"```\n{config_text}\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, project: str, folder: str, run_id: str, run_name: str, params: dict):
        import wandb

        Path(folder).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(
            project=project,
            dir=folder,
            mode="offline",
            id=run_id,
            name=run_name,
            resume="allow",
            config=params,
            allow_val_change=True,  # a resume may change max_steps
            settings=settings,
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fans one record out to every backend. A backend that fails mid-run is reported and dropped for
    the rest of the run: the training (hours of GPU time) must not die for a dashboard."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        for tracker in list(self.trackers):
            try:
                tracker.log_metrics(metrics, record["step"])
            except Exception as err:
                log.error(
                    "tracking: %s failed at step %d (%s); tracking is off for it", tracker.name, record["step"], err
                )
                self.trackers.remove(tracker)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as err:
                log.error("tracking: closing %s failed (%s)", tracker.name, err)


def open_trackers(cfg: TrainJobConfig, ids: dict, first_step: int) -> Trackers:
    """The trackers of cfg.tracking for rank 0, attached to the runs the driver resolved (ids)."""
    from mistral_qa.configio import dump_config

    tracking, trackers = cfg.tracking, []
    if tracking.mlflow is not None:
        trackers.append(MlflowTracker(tracking.mlflow.uri, ids["mlflow"]))
    if tracking.tensorboard is not None:
        trackers.append(TensorBoardTracker(tracking.tensorboard.log_dir, cfg.run.name, dump_config(cfg), first_step))
    if tracking.wandb is not None:
        w = tracking.wandb
        config = cfg.model_dump(mode="json", exclude={"tracking"})  # W&B keeps nested configs
        trackers.append(WandbTracker(w.project, w.dir, ids["wandb"], cfg.run.name, config))
    return Trackers(trackers)
