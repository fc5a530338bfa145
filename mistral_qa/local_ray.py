"""Start a local Ray for a job's driver, and clean it up when the driver dies without shutting it down.

`ray.init()` starts a local Ray (GCS, raylet, dashboard, ...) as children that die with the driver
(Linux PR_SET_PDEATHSIG). The raylet's own children do not: on a SIGKILLed driver the dashboard
agent and the runtime-env agent (~215 MB) notice their raylet is gone, then wait on the dead GCS
for a minute or more before they exit. So `start_ray` starts this watchdog beside the driver, in its own
session: it keeps a list of the driver's descendants and, when the driver's end of a pipe closes
(the driver is gone, however it died), ends those still running: SIGTERM, then SIGKILL.

    python -m mistral_qa.local_ray DRIVER_PID      # started by start_watchdog(); stdin is the pipe

Both jobs' drivers (`python -m train`, `python -m batch`) call start_ray().
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 3.0


_RUNNING: list[subprocess.Popen] = []  # referenced until exit: collecting it would close the pipe


def start_ray() -> None:
    """Join the Ray of RAY_ADDRESS or `ray start`, else start a local one that ends with this driver,
    however the driver ends."""
    import ray

    if ray.is_initialized():
        return
    ray.init()
    start_watchdog()


def start_watchdog() -> subprocess.Popen | None:
    """Watch this process's Ray children; None when it has none (it joined a Ray started elsewhere)."""
    if not psutil.Process().children():
        return None
    # The driver holds the pipe's write end until it exits, by any means: the watchdog reads EOF then.
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "mistral_qa.local_ray", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,  # outlives a kill of the driver's process group
    )
    _RUNNING.append(watchdog)
    return watchdog


def descendants(pid: int) -> dict[int, float]:
    """{pid: start time} of every live descendant of `pid` (start time tells a reused pid apart)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            continue
    return found


def still_running(seen: dict[int, float]) -> list[psutil.Process]:
    alive = []
    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def end(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(processes, timeout=GRACE_S)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


def watch(driver: int) -> None:
    """Track the driver's descendants until stdin reaches EOF, then end the ones still running."""
    seen: dict[int, float] = {}
    while True:
        seen.update(descendants(driver))
        seen.pop(os.getpid(), None)
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 1024):
            break
    time.sleep(POLL_S)  # a driver that exits normally has shut Ray down already; give it a moment
    end(still_running(seen))


if __name__ == "__main__":
    watch(int(sys.argv[1]))
