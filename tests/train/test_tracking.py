"""Experiment tracking (tracking: in the training config) against real backends: an `mlflow server` with a
SQLite store started here on localhost and read back through MlflowClient, TensorBoard event files read
back with TensorBoard's own reader, and W&B's offline run file. One tiny 2-worker run logs to all three."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mistral_qa.configio import ConfigError
from tests.conftest import ROOT, tiny_config
from train.report import read_metrics
from train.tracking import TrackingError, open_runs

RUN = ("scaling.num_workers=2", "training.max_steps=6", "training.eval_every=3", "training.log_every=3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store, proxied artefacts) on a free localhost port."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port, log = free_port(), (tmp / "server.log").open("w")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db"]
    cmd += ["--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp / "server.log")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group started here
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    import requests

    deadline = time.monotonic() + 300  # its imports take long on a busy 2-core machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not become healthy: {log.read_text()[-2000:]}")


def tracked_config(tmp: Path, url: str, *extra: str):
    return tiny_config(
        tmp,
        *RUN,
        "run.name=tracked",
        f"tracking.mlflow.uri={url}",
        f"tracking.tensorboard.log_dir={tmp / 'tb'}",
        f"tracking.wandb.dir={tmp / 'wandb'}",
        *extra,
    )


@pytest.fixture(scope="module")
def tracked_run(ray_session, mlflow_server, tmp_path_factory):
    """One tiny run logging to MLflow, TensorBoard and W&B (offline) at once: (tmp folder, output folder)."""
    from train.launch import run_training

    tmp = tmp_path_factory.mktemp("tracked")
    return tmp, run_training(tracked_config(tmp, mlflow_server))


def mlflow_run(url: str, name: str = "tracked"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("mistral-qa")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_same_losses(logged: list[tuple[int, float]], records: list[dict], rel: float = 1e-9) -> None:
    """logged (step, train loss) pairs are the run's metrics.jsonl, step by step."""
    assert [step for step, _ in logged] == [r["step"] for r in records]
    assert [loss for _, loss in logged] == pytest.approx([r["train_loss"] for r in records], rel=rel)


def test_mlflow_run_holds_config_per_step_metrics_and_artefacts(tracked_run, mlflow_server, tmp_path):
    _, out = tracked_run
    client, run = mlflow_run(mlflow_server)
    records = read_metrics(out / "metrics.jsonl")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["training.max_steps"] == "6" and params["model.name"] == "tiny-mistral"
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert_same_losses(history(client, run.info.run_id, "train_loss"), records)
    assert [s for s, _ in history(client, run.info.run_id, "eval_loss")] == [3, 6]
    for key in ("lr", "tokens_per_s", "peak_memory_gib"):
        assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(1, 7)), key
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "metrics.jsonl", "config.yaml", "adapter"} <= names
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    png = client.download_artifacts(run.info.run_id, "loss_curve.png", str(tmp_path))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_event_files_hold_the_same_losses(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, out = tracked_run
    events = EventAccumulator(str(tmp / "tb" / "tracked"))
    events.Reload()
    records = read_metrics(out / "metrics.jsonl")
    logged = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert_same_losses(logged, records, rel=1e-6)  # float32 in the file
    assert [e.step for e in events.Scalars("eval_loss")] == [3, 6]


def wandb_records(path: Path):
    """The records of W&B's offline .wandb file (LevelDB log format: 32 KiB blocks of chunked records,
    after a 7-byte ':W&B' header); W&B offers no public reader for offline runs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run_holds_config_and_losses(tracked_run):
    tmp, out = tracked_run
    files = list((tmp / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    steps, config = {}, {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train_loss" in items:
                steps[items["_step"]] = items["train_loss"]
        elif kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
    records = read_metrics(out / "metrics.jsonl")
    assert_same_losses(sorted(steps.items()), records)
    assert config["training"]["max_steps"] == 6 and config["model"]["name"] == "tiny-mistral"


def test_unreachable_mlflow_fails_the_cli_before_ray_starts(tmp_path):
    """Nothing listens on the port: exit 1 with the key in the message, before any Ray work."""
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "train", "--config", "train/configs/tiny.yaml", f"tracking.mlflow.uri={uri}"]
    cmd += [f"run.output_dir={tmp_path / 'out'}", f"run.storage_path={tmp_path / 'ray'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray start would show in the output
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"error: tracking.mlflow.uri={uri}: no MLflow server answers" in done.stderr
    assert "Ray" not in done.stdout + done.stderr and not (tmp_path / "out").exists()


def test_a_server_that_never_answers_fails_within_seconds(tmp_path, monkeypatch):
    """A port that accepts connections but never replies (a hung server): the probe times out, no hang
    (MLflow's own client would wait 120 s per try, 7 tries)."""
    import train.tracking

    monkeypatch.setattr(train.tracking, "PROBE_TIMEOUT_S", 1.0)  # 5 s in real runs; the test needs no wait
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        cfg = tiny_config(tmp_path, f"tracking.mlflow.uri={uri}")
        started = time.monotonic()
        with pytest.raises(TrackingError, match="tracking.mlflow.uri=.*no MLflow server answers"):
            open_runs(cfg, str(tmp_path / "ray" / "tiny"))
        assert time.monotonic() - started < 20


def test_required_false_turns_only_the_dead_backend_off(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_config(
        tmp_path, f"tracking.mlflow.uri={uri}", "tracking.required=false", "tracking.tensorboard.log_dir=tb"
    )
    tracking, ids = open_runs(cfg, str(tmp_path / "ray" / "tiny"))
    assert tracking.mlflow is None and tracking.tensorboard is not None and ids == {}
    assert "tracking is off for MLflow" in caplog.text and "tracking.mlflow.uri" in caplog.text


def test_tracking_config_refuses_what_it_does_not_do(tmp_path):
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        tiny_config(tmp_path, "tracking.wandb.mode=online")  # online needs the network: not supported here
    with pytest.raises(ConfigError, match="tracking.mlflow.uri"):
        tiny_config(tmp_path, "tracking.mlflow.experiment=x")
    with pytest.raises(ConfigError, match="tracking.neptune: unknown key"):
        tiny_config(tmp_path, "tracking.neptune.project=x")


@pytest.mark.slow
def test_resumed_run_continues_the_same_tracked_runs(tracked_run, mlflow_server):
    """Re-running the same run.name with more steps extends the same MLflow run, TensorBoard folder and
    W&B run id instead of starting new ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.launch import run_training

    tmp, _ = tracked_run
    _, before = mlflow_run(mlflow_server)
    out = run_training(tracked_config(tmp, mlflow_server, "training.max_steps=9"))
    client, run = mlflow_run(mlflow_server)  # still exactly one run of that name
    assert run.info.run_id == before.info.run_id and run.info.status == "FINISHED"
    records = read_metrics(out / "metrics.jsonl")
    assert_same_losses(history(client, run.info.run_id, "train_loss"), records)
    assert run.data.tags["resumed.training.max_steps"] == "9" and run.data.params["training.max_steps"] == "6"
    events = EventAccumulator(str(tmp / "tb" / "tracked"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, 10))
    ids = {p.name.rsplit("-", 1)[1] for p in (tmp / "wandb" / "wandb").glob("offline-run-*")}
    assert len(ids) == 1  # two offline folders (one per attempt) of one W&B run id; `wandb sync` joins them


@pytest.mark.slow
def test_required_false_trains_without_the_dead_server(ray_session, tmp_path, caplog):
    from train.launch import run_training

    uri = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_config(tmp_path, *RUN, "run.name=untracked", f"tracking.mlflow.uri={uri}", "tracking.required=false")
    out = run_training(cfg)
    assert "tracking is off for MLflow" in caplog.text
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))
