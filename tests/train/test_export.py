"""python -m train.export: adapter + base -> a plain model folder that transformers loads and that
answers as the engine does with the adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_qa.prompt import build_prompt
from train.export import main as export_main

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["Does phone use before bed hurt sleep?", "How should I hold my phone to protect my neck?"]


def engine_answers(adapter: Path, max_tokens: int) -> list:
    from mistral_qa.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(adapters={"tuned": str(adapter)}, max_batch_size=4))
    try:
        done = engine.generate([build_prompt(q) for q in QUESTIONS], SamplingParams(max_tokens=max_tokens), "tuned")
    finally:
        engine.close()
    return done


def exported_answers(folder: Path, max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    answers = []
    for question in QUESTIONS:
        ids = tokenizer(build_prompt(question), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        answers.append(out[0, ids.shape[1] :].tolist())
    return answers


def check_export(adapter: Path, out: Path, max_tokens: int) -> None:
    assert export_main(["--adapter", str(adapter), "--out", str(out), "--dtype", "float32"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "mistral_qa_export.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any(n.endswith(".bin") for n in names)
    assert "adapter_config.json" not in names  # merged: a plain model, no PEFT needed
    for exported, engine in zip(exported_answers(out, max_tokens), engine_answers(adapter, max_tokens), strict=True):
        # The engine also stops at the template's stop strings ("### Instruction"), which generate does not know.
        assert exported[: len(engine.token_ids)] == engine.token_ids
        assert len(engine.token_ids) == len(exported) or engine.finish_reason == "stop"


def test_tiny_export_answers_as_the_engine_does(tiny_adapter, tmp_path):
    check_export(tiny_adapter, tmp_path / "merged", max_tokens=12)


def test_export_refuses_a_non_empty_folder_and_a_missing_adapter(tiny_adapter, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main(["--adapter", str(tiny_adapter), "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert export_main(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_push_to_hub_offline_fails_clearly_and_keeps_the_export(tiny_adapter, tmp_path):
    out = tmp_path / "merged"
    secret = "hf_test_secret_token_value"
    env = {**os.environ, "HF_TOKEN": secret, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    command = [sys.executable, "-m", "train.export", "--adapter", str(tiny_adapter), "--out", str(out)]
    proc = subprocess.run(
        [*command, "--push-to-hub", "someone/mistral-qa"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "the hub is unreachable" in proc.stderr
    assert secret not in proc.stdout + proc.stderr
    assert (out / "config.json").is_file()

    # Without a token it fails before the merge (minutes for a 7B model), writing nothing.
    no_token = {k: v for k, v in env.items() if k not in ("HF_TOKEN", "HF_TOKEN_FILE")}
    never = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "train.export", "--adapter", str(tiny_adapter), "--out", str(never)]
        + ["--push-to-hub", "someone/mistral-qa"],
        cwd=ROOT,
        env=no_token,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "HF_TOKEN" in proc.stderr and not never.exists()


@pytest.mark.slow
def test_smollm2_export_answers_as_the_engine_does(smollm2_adapter, tmp_path):
    check_export(smollm2_adapter, tmp_path / "merged", max_tokens=24)
