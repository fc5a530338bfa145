"""s3:// for real: a moto S3 server on localhost, credentials and endpoint from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), and the jobs run as users run them
(`python -m train`, `python -m batch`, their own local Ray) with checkpoints, the adapter, the
questions and the answers in the bucket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "mistral-qa-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server on localhost with one bucket; yields the environment that points at it."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = wait_for_s3()
        fs.create_dir(BUCKET)
        yield {**os.environ, **env}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=30)


def wait_for_s3() -> pafs.S3FileSystem:
    deadline = time.monotonic() + 60
    while True:
        try:
            fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
            fs.get_file_info(pafs.FileSelector("", recursive=False))
            return fs
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def s3() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def run(command: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**env, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_tiny(env: dict, tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run(
        [
            "-m",
            "train",
            "--config",
            "train/configs/tiny.yaml",
            f"run.output_dir={tmp / 'outputs'}",
            f"run.storage_path=s3://{BUCKET}/ray",
            "training.max_steps=6",
            "training.eval_every=3",
            *overrides,
        ],
        env,
    )


def losses(metrics: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in metrics.read_text().splitlines() if "train_loss" in line]


@pytest.mark.slow  # two training runs, each with its own local Ray: minutes on 2 cores
def test_training_checkpoints_to_the_bucket_and_resumes_from_it_after_a_failure(s3_env, tmp_path):
    train_tiny(s3_env, tmp_path / "clean", "run.name=clean")
    train_tiny(s3_env, tmp_path / "failed", "run.name=failed", "run.fail_at_step=4", "run.max_failures=1")
    stored = [i.path for i in s3().get_file_info(pafs.FileSelector(f"{BUCKET}/ray/failed", recursive=True))]
    assert any("checkpoint" in p and p.endswith("adapter_model.safetensors") for p in stored), stored
    # the restarted run continued from the bucket's step-3 checkpoint: the same losses as the clean run
    clean, failed = (losses(tmp_path / r / "outputs" / r / "metrics.jsonl") for r in ("clean", "failed"))
    assert failed and failed == pytest.approx(clean, rel=1e-5)


def test_an_adapter_in_the_bucket_is_served_and_answers_a_question_file_from_the_bucket(
    s3_env, tiny_adapter, tmp_path, monkeypatch
):
    from mistral_qa.engine import Engine, EngineConfig, SamplingParams
    from mistral_qa.prompt import build_prompt

    fs = s3()
    pafs.copy_files(
        str(tiny_adapter),
        f"{BUCKET}/adapters/tiny",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    questions = [{"id": f"q{i}", "question": f"Does screen time at hour {i} hurt sleep?"} for i in range(12)]
    with fs.open_output_stream(f"{BUCKET}/questions/part-0.jsonl") as out:
        out.write("".join(json.dumps(q) + "\n" for q in questions).encode())

    adapter = f"s3://{BUCKET}/adapters/tiny"
    env = {**s3_env, "MISTRAL_QA_CACHE": str(tmp_path / "cache")}  # a cold cache: the adapter comes from the bucket
    run(
        [
            "-m",
            "batch",
            "--config",
            "batch/configs/tiny.yaml",
            "--input",
            f"s3://{BUCKET}/questions/",
            "--output",
            f"s3://{BUCKET}/answers/",
            f"adapter={adapter}",
        ],
        env,
    )
    files = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/answers", recursive=True))
        if i.path.endswith(".parquet")
    ]
    table = pq.ParquetDataset(files, filesystem=fs).read()
    assert sorted(table.column("id").to_pylist()) == sorted(q["id"] for q in questions)

    # the engine (what each Serve replica runs) loads the same adapter from the bucket and answers alike
    monkeypatch.setenv("MISTRAL_QA_CACHE", str(tmp_path / "cache-serve"))
    engine = Engine(EngineConfig(adapters={"tiny": adapter}, max_batch_size=4))
    try:
        [answer] = engine.generate([build_prompt(questions[0]["question"])], SamplingParams(max_tokens=8), "tiny")
    finally:
        engine.close()
    rows = dict(zip(table.column("id").to_pylist(), table.column("answer").to_pylist(), strict=True))
    assert rows["q0"] == answer.text
