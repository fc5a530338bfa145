"""The driver-side checks both jobs share: absolute paths for Ray processes, and enough GPUs (real Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mistral_qa.preflight import PreflightError, absolute


def test_local_paths_become_absolute_and_uris_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("data/q.jsonl") == str(tmp_path.resolve() / "data" / "q.jsonl")
    assert absolute("~/q.jsonl") == str(Path.home().resolve() / "q.jsonl")
    assert absolute("s3://bucket/q.jsonl") == "s3://bucket/q.jsonl"


def test_both_jobs_refuse_gpus_the_cluster_lacks_with_one_error(ray_session):
    """The CPU test cluster has no GPU: asking for one fails before any worker or actor starts."""
    from batch.config import BatchJobConfig
    from batch.pipeline import check_resources as batch_check
    from train.config import TrainJobConfig
    from train.launch import check_resources as train_check

    train_check(TrainJobConfig())  # CPU workers need no GPU
    batch_check(BatchJobConfig(adapter="outputs/run/adapter"))
    gpu_train = TrainJobConfig.model_validate({"scaling": {"use_gpu": True, "num_workers": 2}})
    with pytest.raises(
        PreflightError,
        match=r"scaling.num_workers=2 needs 2 GPUs; the Ray cluster has 0\. .*"
        r"train/configs/quickstart.yaml",
    ):
        train_check(gpu_train)
    gpu_batch = BatchJobConfig.model_validate(
        {"adapter": "outputs/run/adapter", "compute": {"num_gpus_per_actor": 0.5}}
    )
    with pytest.raises(PreflightError, match=r"compute.num_gpus_per_actor=0.5 needs 0.5 GPUs; .*batch/configs/"):
        batch_check(gpu_batch)
