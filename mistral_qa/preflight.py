"""Checks a job makes on its driver before any worker or actor starts, and the error they raise.

Training and the batch job both hand local paths to Ray processes that may run in another folder,
and both ask the Ray cluster for GPUs; the rule for each lives here once.
"""

from __future__ import annotations

from pathlib import Path


class PreflightError(RuntimeError):
    """The job cannot start (no GPUs, no data, no input or output); raised before any work."""


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers and actors may run in another folder); URIs such as
    s3:// pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def require_gpus(needed: float, setting: str, cpu_config: str) -> None:
    """Raise PreflightError when the Ray cluster has fewer than `needed` GPUs; the message names the
    `setting` that asks for them and a `cpu_config` that runs without."""
    import ray  # here: the jobs' CLIs import this module before Ray is needed

    have = ray.cluster_resources().get("GPU", 0)
    if have < needed:
        raise PreflightError(
            f"{setting} needs {needed:g} GPUs; the Ray cluster has {have:g}. Use a GPU cluster, "
            f"or a CPU config (e.g. {cpu_config})."
        )
