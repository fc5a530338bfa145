"""locate_tokenizer: the batch driver's check that a base model's tokenizer can be found, without
loading it: each model source, and a clear error (naming what to do) when it cannot be found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.model import ModelLoadError, locate_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_a_random_shape_uses_the_mistral_tokenizer_folder():
    where = Path(locate_tokenizer(ModelConfig(source="random", name="mistral-7b")))
    assert (where / "tokenizer.json").is_file()


def test_a_local_folder_needs_tokenizer_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        locate_tokenizer(ModelConfig(source="local", name=str(tmp_path / "missing")))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="it has none of tokenizer_config.json"):
        locate_tokenizer(ModelConfig(source="local", name=str(tmp_path)))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert locate_tokenizer(ModelConfig(source="local", name=str(tmp_path))) == str(tmp_path)


def test_a_hub_model_offline_fails_with_what_to_do(tmp_path):
    code = (
        "from mistral_qa.config import ModelConfig\n"
        "from mistral_qa.model import ModelLoadError, locate_tokenizer\n"
        "try:\n"
        "    locate_tokenizer(ModelConfig(source='hub', name='mistralai/Mistral-7B-v0.1'))\n"
        "except ModelLoadError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty hub cache
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "cannot load 'mistralai/Mistral-7B-v0.1' from the Hugging Face hub" in done.stdout, done.stderr[-2000:]
    assert "model.source=local" in done.stdout
