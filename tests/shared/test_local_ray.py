"""A SIGKILLed batch or training driver leaves no process of the local Ray it started
(mistral_qa/local_ray.py): first with plain processes standing in for Ray's (seconds), then (slow) a
real `python -m batch` and a real `python -m train` driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "batch" / "configs" / "tiny.yaml"

# A driver whose child starts a grandchild and exits, as the raylet's agents outlive the raylet.
DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from mistral_qa.local_ray import start_watchdog
    child = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"])
    start_watchdog()
    print("ready", flush=True)
    time.sleep(300)
    """
)


def snapshot(pid: int) -> dict[int, float]:
    found = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            found[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            continue
    return found


def alive(seen: dict[int, float]) -> list[psutil.Process]:
    left = []
    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except psutil.NoSuchProcess:
            continue
    return left


def wait_gone(seen: dict[int, float], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := alive(seen)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in left:  # a failing test must not leak them
        process.kill()
    return left


def test_the_watchdog_ends_the_drivers_descendants_when_it_is_killed():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert driver.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # the watchdog's first look at the driver's descendants
    seen = snapshot(driver.pid)
    names = sorted(psutil.Process(p).name() for p in seen)
    assert "sleep" in names and len(seen) == 3, names  # child, grandchild, watchdog
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert wait_gone(seen, timeout=15) == []


@pytest.mark.slow  # a local Ray of its own: ~30-60 s on 2 cores
def test_a_sigkilled_batch_driver_leaves_no_ray_process(tmp_path):
    from batch.output import answer_files

    with (tmp_path / "q.jsonl").open("w") as f:
        for i in range(2000):
            f.write(json.dumps({"question": f"Question {i}?"}) + "\n")
    out = tmp_path / "answers"
    cmd = [sys.executable, "-m", "batch", "--config", str(TINY), "--input", str(tmp_path / "q.jsonl")]
    cmd += ["--output", str(out), "output.rows_per_file=20", "compute.batch_size=20"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user runs it
    with open(tmp_path / "job.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 300
        while not answer_files(str(out)) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        seen = snapshot(driver.pid)
        names = sorted(f"{p.name()}: {' '.join(p.cmdline())[:40]}" for p in alive(seen))
        assert any(n.startswith("raylet") for n in names) and any("DashboardAgent" in n for n in names), names
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver alone, not its process group
        driver.wait()
    assert wait_gone(seen, timeout=30) == [], names


@pytest.mark.slow  # a local Ray of its own and a real (tiny) training run
def test_a_sigkilled_training_driver_leaves_no_ray_process(tmp_path):
    cmd = [sys.executable, "-m", "train", "--config", "train/configs/tiny.yaml", f"run.output_dir={tmp_path}/out"]
    cmd += [f"run.storage_path={tmp_path}/ray", "training.max_steps=100000", "training.eval_every=100000"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "job.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 300
        while "step " not in (tmp_path / "job.log").read_text() and driver.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        seen = snapshot(driver.pid)
        names = sorted(f"{p.name()}: {' '.join(p.cmdline())[:40]}" for p in alive(seen))
        assert any(n.startswith("raylet") for n in names), names
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert wait_gone(seen, timeout=30) == [], names
