"""Shared fixtures: one local Ray instance per test session, the tiny config, a trained tiny adapter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MISTRAL_QA_CACHE", str(Path.home() / ".cache" / "mistral-qa"))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs Ray (started once: ~10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def tiny_config(tmp: Path, *overrides: str):
    from mistral_qa.config import TrainJobConfig
    from mistral_qa.configio import load_config

    return load_config(
        TrainJobConfig,
        ROOT / "train" / "configs" / "tiny.yaml",
        [f"run.output_dir={tmp / 'outputs'}", f"run.storage_path={tmp / 'ray'}", *overrides],
    )


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory) -> Path:
    """A tiny Mistral LoRA run trained once per session (1 worker, 10 steps); returns its output folder."""
    from train.launch import run_training

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(tmp, "scaling.num_workers=1", "training.max_steps=10", "run.name=shared-tiny")
    return run_training(cfg)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_run) -> Path:
    """The adapter folder of the session's tiny run (adapter_model.safetensors, tokenizer, training_config.yaml)."""
    return tiny_run / "adapter"
