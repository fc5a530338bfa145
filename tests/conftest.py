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
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}{os.pathsep}${{PYTHONPATH}}"}},
        )
        # Ray's own helper processes (and any subprocess) must join this instance, not another
        # cluster that a test started on the same machine.
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    ray.shutdown()


def tiny_config(tmp: Path, *overrides: str):
    from mistral_qa.configio import load_config
    from train.config import TrainJobConfig

    return load_config(
        TrainJobConfig,
        ROOT / "train" / "configs" / "tiny.yaml",
        [f"run.output_dir={tmp / 'outputs'}", f"run.storage_path={tmp / 'ray'}", *overrides],
    )


# The settings of the session's tiny run; fault-tolerance tests rerun them and compare losses.
TINY_RUN = ("scaling.num_workers=2", "training.max_steps=10", "training.eval_every=5")


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory) -> Path:
    """A tiny Mistral LoRA run (2 workers, 10 steps, eval every 5) trained once per session; its output folder."""
    from train.launch import run_training

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(tmp, *TINY_RUN, "run.name=shared-tiny")
    return run_training(cfg)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_run) -> Path:
    """The adapter folder of the session's tiny run (adapter_model.safetensors, tokenizer, training_config.yaml)."""
    return tiny_run / "adapter"


SERVE_PORT = 8000  # the session Serve app; other tests that start Serve elsewhere use other ports


@pytest.fixture(scope="session")
def serve_url(ray_session, tiny_adapter) -> str:
    """The session's Serve app at http://127.0.0.1:8000, built by serve.app:build_app as
    `serve run` would: the tiny base as "base", the session's tiny adapter as "tiny"."""
    from ray import serve as ray_serve

    from serve.app import build_app

    ray_serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    args = {"engine": {"adapters": {"tiny": str(tiny_adapter)}, "max_batch_size": 8}, "default_max_tokens": 32}
    ray_serve.run(build_app(args), name="mistral-qa", route_prefix="/")
    yield f"http://127.0.0.1:{SERVE_PORT}"
    ray_serve.delete("mistral-qa")


@pytest.fixture(scope="session")
def smollm2_adapter(ray_session, tmp_path_factory) -> Path:
    """outputs/quickstart/adapter when `make quickstart` has made it, else a short quickstart-like run
    (SmolLM2-135M-Instruct's real weights, 10 steps)."""
    made = ROOT / "outputs" / "quickstart" / "adapter"
    if (made / "adapter_config.json").is_file():
        return made
    from mistral_qa.configio import load_config
    from train.config import TrainJobConfig
    from train.launch import run_training

    tmp = tmp_path_factory.mktemp("quickstart")
    overrides = [
        f"run.output_dir={tmp / 'outputs'}",
        f"run.storage_path={tmp / 'ray'}",
        "run.name=quickstart-short",
        "training.max_steps=10",
        "training.eval_every=10",
        "optim.warmup_steps=2",
        "scaling.cpus_per_worker=1",
    ]
    cfg = load_config(TrainJobConfig, ROOT / "train" / "configs" / "quickstart.yaml", overrides)
    return run_training(cfg) / "adapter"
