"""Config loading: YAML + overrides, unknown keys and bad values fail naming the key (no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mistral_qa.configio import ConfigError, load_config, parse_override
from train.config import TrainJobConfig

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = sorted((ROOT / "train" / "configs").glob("*.yaml"))


def test_train_configs_exist():
    assert {p.name for p in TRAIN_CONFIGS} >= {"tiny.yaml", "quickstart.yaml", "mistral7b_alpaca.yaml"}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_train_yaml_loads_and_starts_with_its_command(path):
    cfg = load_config(TrainJobConfig, path)
    assert cfg.run.name
    assert path.read_text().splitlines()[0].startswith(f"# python -m train --config train/configs/{path.name}")


def test_reference_config_matches_the_seed_run():
    cfg = load_config(TrainJobConfig, ROOT / "train/configs/mistral7b_alpaca.yaml")
    assert cfg.model.name == "mistralai/Mistral-7B-v0.1" and cfg.model.source == "hub"
    assert cfg.data.source == "tatsu-lab/alpaca"
    assert (cfg.lora.r, cfg.lora.target_modules) == (16, ["q_proj", "v_proj"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule) == ("paged_adamw_32bit", 2e-4, "cosine")
    assert (cfg.training.max_steps, cfg.training.eval_every, cfg.training.precision) == (2000, 100, "fp16")
    assert cfg.scaling.use_gpu and not cfg.model.trust_remote_code


def test_overrides_are_parsed_as_yaml():
    assert parse_override("training.max_steps=5") == (["training", "max_steps"], 5)
    assert parse_override("lora.target_modules=[q_proj, k_proj]") == (["lora", "target_modules"], ["q_proj", "k_proj"])
    cfg = load_config(TrainJobConfig, ROOT / "train/configs/tiny.yaml", ["optim.lr=1e-3", "run.name=x"])
    assert cfg.optim.lr == 1e-3 and cfg.run.name == "x"


@pytest.mark.parametrize(
    "override, key",
    [
        ("lora.rank=8", "lora.rank: unknown key"),
        ("nosuch.thing=1", "nosuch: unknown key"),
        ("training.max_steps=-3", "training.max_steps"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("optim.name=sgd", "optim.name"),
        ("run.name=has space", "run.name"),
        ("run.name=..", "run.name"),
        ("run.name=.", "run.name"),
        ("run.name=a/b", "run.name"),
        ("run.name=''", "run.name"),
        ("training.batch_size=many", "training.batch_size"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TrainJobConfig, ROOT / "train/configs/tiny.yaml", [override])


def test_bad_combinations_are_rejected():
    with pytest.raises(ConfigError, match="precision=fp16 needs scaling.use_gpu"):
        load_config(TrainJobConfig, None, ["training.deepspeed={stage: 2}", "training.precision=fp16"])
    with pytest.raises(ConfigError, match="load_in_4bit needs scaling.use_gpu"):
        load_config(TrainJobConfig, None, ["model.load_in_4bit=true"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(TrainJobConfig, None, ["training.max_steps=5", "optim.warmup_steps=5"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(TrainJobConfig, None, ["training.max_steps"])
    with pytest.raises(ConfigError, match="batch_tokens must be at least data.max_length"):
        load_config(TrainJobConfig, None, ["data.max_length=512", "training.batch_tokens=500"])
    with pytest.raises(ConfigError, match="compile is not supported with training.deepspeed"):
        load_config(TrainJobConfig, None, ["training.compile=true", "training.deepspeed={stage: 2}"])
    with pytest.raises(ConfigError, match="two batch layouts"):
        load_config(TrainJobConfig, None, ["training.group_by_length=true", "training.batch_tokens=4096"])


def test_missing_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainJobConfig, ROOT / "nope.yaml")


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_rejects_bad_key_before_ray_starts():
    result = run_cli("--config", "train/configs/tiny.yaml", "training.max_stepz=3")
    assert result.returncode == 2
    assert "training.max_stepz: unknown key" in result.stderr
    assert "Ray" not in result.stderr + result.stdout  # nothing was started


def test_reference_run_fails_clearly_without_the_hub():
    result = run_cli("--config", "train/configs/mistral7b_alpaca.yaml")
    assert result.returncode == 1
    assert "cannot load 'mistralai/Mistral-7B-v0.1' from the Hugging Face hub" in result.stderr
    assert "Traceback" not in result.stderr
