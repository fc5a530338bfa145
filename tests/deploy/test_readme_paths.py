"""The README's CPU shell blocks run as printed (slow): `ray job submit` on a `ray start` cluster with
Ray 2.60's token auth, the batch job's CPU block, and `serve run serve/config.yaml`.

Each runs in bash in a fresh copy of the checkout (tracked and untracked files, no outputs), with the
venv first on PATH, a HOME of its own that holds a Ray auth token (as ray.init() leaves one behind),
a Ray temp root of its own (RAY_TMPDIR), and a marker variable in its environment: every process it starts inherits the marker, and the test
ends exactly those afterwards (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = "MISTRAL_QA_README_TEST"


def readme_block(name: str) -> str:
    """The ```bash block right after `<!-- test: name ... -->` in README.md."""
    text = README.read_text()
    match = re.search(rf"<!-- test: {re.escape(name)}\b.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README.md has no block marked <!-- test: {name} -->"
    return match.group(1)


def readme_line(command: str) -> str:
    """The README line that starts with `command` (indented code), as printed (its comment dropped)."""
    for line in README.read_text().splitlines():
        if line.strip().startswith(command):
            return line.split("#", 1)[0].strip()
    raise AssertionError(f"README.md has no line starting with {command!r}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def checkout_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked + untracked, not ignored): no venv, outputs, .git."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture
def sandbox(tmp_path):
    """(copy of the checkout, environment for bash); ends every process that carries the marker."""
    marker = uuid.uuid4().hex
    home = tmp_path / "home"
    # A token already there, as on any machine where ray.init() has run: `ray start` then turns token
    # auth on, and a CLI without RAY_AUTH_MODE=token fails against it (the case the README must handle).
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    # Ray's temp root of its own: `ray start` records its cluster in <temp>/ray/ray_current_cluster,
    # which every later plain ray.init() on the machine would try to join once the cluster is gone.
    # Short (Unix socket paths inside it are limited to ~107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="rq-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", RAY_TMPDIR=ray_tmp)
    env[MARKER] = marker
    yield checkout_copy(tmp_path / "repo"), env
    end_marked(marker)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def end_marked(marker: str) -> None:
    marked = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == marker:
                marked.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for process in marked:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(marked, timeout=10)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


def run_bash(script: str, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_ray_job_submit_block_runs_as_printed(sandbox):
    repo, env = sandbox
    if not (port_free(6379) and port_free(8265)):
        pytest.skip("ray start's default ports (6379, 8265) are taken on this machine")
    result = run_bash(readme_block("ray-job-submit"), repo, env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert (repo / "outputs" / "tiny" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def with_quickstart_adapter(sandbox, smollm2_adapter):
    repo, env = sandbox
    shutil.copytree(smollm2_adapter, repo / "outputs" / "quickstart" / "adapter")
    return repo, env


@pytest.mark.slow
def test_batch_cpu_block_runs_as_printed(with_quickstart_adapter):
    repo, env = with_quickstart_adapter
    with (repo / "questions.jsonl").open("w") as f:
        for i, question in enumerate(["Does phone use before bed hurt sleep?", "Is screen time bad for eyes?"]):
            f.write(json.dumps({"id": f"mine-{i}", "question": question}) + "\n")
    result = run_bash(readme_block("batch-cpu"), repo, env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("batch summary") == 2 and "max_tokens: 64" in result.stdout
    sys.path.insert(0, str(ROOT))
    from batch.output import read_answers

    assert read_answers(str(repo / "outputs" / "quickstart" / "answers")).num_rows == 65
    mine = read_answers(str(repo / "answers"))
    assert sorted(mine.column("id").to_pylist()) == ["mine-0", "mine-1"]
    assert all(row["error"] is None and row["answer"] for row in mine.to_pylist())


@pytest.mark.slow
def test_serve_run_line_runs_as_printed(with_quickstart_adapter):
    repo, env = with_quickstart_adapter
    if not port_free(8000):
        pytest.skip("port 8000 (serve/config.yaml's) is taken on this machine")
    command = readme_line("serve run serve/config.yaml")
    server = subprocess.Popen(["bash", "-c", command], cwd=repo, env=env, start_new_session=True)
    try:
        deadline, models = time.monotonic() + 600, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=5) as response:
                    models = json.load(response)
                break
            except OSError:
                time.sleep(2)
        assert models is not None, f"serve run exited with {server.poll()} or never answered"
        assert "mobile-health" in {m["id"] for m in models["data"]}
    finally:
        os.killpg(server.pid, signal.SIGINT)  # serve run shuts its app and its local Ray down on Ctrl-C
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
