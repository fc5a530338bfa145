"""The training job on real Ray (local, CPU) with the tiny Mistral: outputs, learning, faults, resume."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_RUN, tiny_config
from train.launch import run_training
from train.report import read_metrics


def losses(run_dir):
    return [(r["step"], r["train_loss"], r.get("eval_loss")) for r in read_metrics(run_dir / "metrics.jsonl")]


def test_run_writes_adapter_metrics_plot_and_config(tiny_run):
    adapter = tiny_run / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_config.yaml"):
        assert (adapter / name).is_file(), name
    assert not list(adapter.glob("*.bin")) and not list(adapter.glob("*.pt"))
    assert (tiny_run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "name: tiny-mistral" in (tiny_run / "config.yaml").read_text()
    records = read_metrics(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10]
    for key in ("train_loss", "lr", "tokens_per_s", "nonpad_tokens_per_s", "peak_memory_gib"):
        assert all(r[key] > 0 for r in records), key


def test_adapter_loads_onto_the_base_with_peft(tiny_run):
    from peft import PeftModel

    from mistral_qa.config import ModelConfig
    from mistral_qa.model import load_base_model

    base = load_base_model(ModelConfig(source="random", name="tiny-mistral"), torch.float32)
    ids = torch.tensor([[1, 20811, 349, 396, 13126]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(tiny_run / "adapter"))
    after = model(ids).logits
    assert not torch.allclose(before, after)  # the trained adapter changes the output
    assert json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_loss_goes_down_on_a_small_repeated_dataset(ray_session, tmp_path):
    cfg = tiny_config(
        tmp_path,
        "scaling.num_workers=1",
        "data.max_rows=24",
        "data.eval_size=8",
        "training.max_steps=30",
        "training.eval_every=10",
        "optim.lr=0.01",
        "lora.dropout=0.0",
        "run.name=learns",
    )
    records = losses(run_training(cfg))
    train = [t for _, t, _ in records]
    evals = [e for _, _, e in records if e is not None]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5, train  # 24 rows seen 5 times: it memorises
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2], evals


def test_worker_failure_restarts_from_checkpoint_with_identical_losses(tiny_run, tmp_path):
    cfg = tiny_config(tmp_path, *TINY_RUN, "run.name=faulty", "run.fail_at_step=7", "run.max_failures=1")
    out = run_training(cfg)
    assert losses(out) == losses(tiny_run)  # steps 6-7 were replayed from checkpoint 5, bit for bit


@pytest.mark.slow  # ~90 s; worker-failure recovery from a checkpoint stays in the default run
def test_stopped_run_resumes_under_the_same_name(tiny_run, tmp_path):
    from ray.train.v2.api.exceptions import TrainingFailedError

    cfg = tiny_config(tmp_path, *TINY_RUN, "run.name=resumable", "run.fail_at_step=8", "run.max_failures=0")
    with pytest.raises(TrainingFailedError):
        run_training(cfg)  # stops after the step-5 checkpoint
    assert (tmp_path / "ray" / "resumable" / "checkpoint_000005").is_dir()
    cfg.run.fail_at_step = None
    assert losses(run_training(cfg)) == losses(tiny_run)


@pytest.mark.slow  # two Ray runs (~2 min); the schedule's determinism is covered by tests/train/test_batch_schedule.py
def test_token_budget_run_restarts_from_checkpoint_with_identical_losses(ray_session, tmp_path):
    """training.batch_tokens: length-grouped batches on 2 workers; a worker failing at step 5 restarts the
    group from the step-3 checkpoint, and the run ends with the losses of an uninterrupted run, bit for bit."""
    budget_run = ("scaling.num_workers=2", "training.max_steps=6", "training.eval_every=3", "training.batch_tokens=512")
    uninterrupted = run_training(tiny_config(tmp_path, *budget_run, "run.name=budget"))
    records = read_metrics(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    padding = max(1 - r["nonpad_tokens_per_s"] / r["tokens_per_s"] for r in records)
    assert padding < 0.1, padding  # length-grouped (batch_size=4 rows pad about a quarter of the tokens)
    cfg = tiny_config(tmp_path, *budget_run, "run.name=budget-faulty", "run.fail_at_step=5", "run.max_failures=1")
    assert losses(run_training(cfg)) == losses(uninterrupted)


def test_data_with_no_trainable_rows_fails_once_before_ray_starts(tmp_path):
    """Every row longer than data.max_length: one error with the counts, no Ray, no retries."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    args = ["data.max_length=16", f"run.output_dir={tmp_path / 'out'}", f"run.storage_path={tmp_path / 'ray'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", "train/configs/tiny.yaml", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no training rows left" in errors[0], result.stderr[-2000:]
    assert "over_max_length: 208" in errors[0] and "data.max_length=16" in errors[0]
    assert "Traceback" not in result.stderr and "Ray instance" not in result.stderr
    assert not (tmp_path / "ray").exists()
