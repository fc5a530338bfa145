"""Merge a LoRA adapter into its base and write a plain model folder that any transformers-based
server loads: safetensors shards, config.json, generation_config.json and the tokenizer.

    from train.merge import export_merged
    export_merged("outputs/quickstart/adapter", Path("outputs/quickstart/merged"))

The base is the one recorded in the adapter's training_config.yaml (or given). The folder is written
next to its destination and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from mistral_qa.adapters import check_prompt_template, read_training_config, resolve_adapter
from mistral_qa.config import ModelConfig
from mistral_qa.engine.loading import DTYPES  # the names the engine and the export both accept
from mistral_qa.model import ModelLoadError, hub_token, load_base_model, load_tokenizer

log = logging.getLogger(__name__)

EXPORT_INFO = "mistral_qa_export.json"


class ExportError(RuntimeError):
    """The export cannot be made or published; the message says why and what to do."""


def base_of(adapter_dir: Path, model: ModelConfig | None) -> ModelConfig:
    """The explicit base, else the one the adapter was trained on."""
    if model is not None:
        return model
    training = read_training_config(adapter_dir)
    if not training or "model" not in training:
        raise ExportError(
            f"{adapter_dir} has no training_config.yaml with a model: section; give the base with --model-source/--model-name"
        )
    return ModelConfig.model_validate(training["model"])


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: folder is not empty (pass --overwrite to replace it)")


def merged_model(adapter_dir: Path, base: ModelConfig, dtype: torch.dtype):
    """The base with the adapter's weights added in, as a plain transformers model (no PEFT wrapper)."""
    from peft import PeftModel

    if base.load_in_4bit:
        raise ExportError("cannot merge into 4-bit weights: export from a base loaded with model.load_in_4bit=false")
    model = load_base_model(base.model_copy(update={"load_in_4bit": False}), dtype, "cpu")
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return model.merge_and_unload().eval()


def export_merged(
    adapter: str,
    out: Path,
    model: ModelConfig | None = None,
    dtype: str = "float16",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write adapter + base merged into `out`; returns `out`."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser().resolve()
    check_destination(out, overwrite)
    adapter_dir = resolve_adapter(adapter)
    check_prompt_template("adapter", read_training_config(adapter_dir))
    base = base_of(adapter_dir, model)
    log.info("merging %s into %s (%s)", adapter, base.name, dtype)
    merged = merged_model(adapter_dir, base, DTYPES[dtype])
    tokenizer = load_tokenizer(base)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        info = {"adapter": adapter, "base": base.model_dump(), "dtype": dtype}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_hub_token() -> str:
    """The hub token from HF_TOKEN / HF_TOKEN_FILE; ExportError without one."""
    token = hub_token()
    if token is None:
        raise ExportError("--push-to-hub needs a hub token: set HF_TOKEN or HF_TOKEN_FILE")
    return token


def push_to_hub(folder: Path, repo: str, private: bool = True) -> str:
    """Upload an exported folder to the hub repo `repo` (created if missing) with HF_TOKEN /
    HF_TOKEN_FILE; returns the repo's URL. Offline or without a token: ExportError."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=check_hub_token())
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="mistral-qa export")
    except HfHubHTTPError as err:  # the hub answered: bad token, no rights, bad name
        raise ExportError(f"--push-to-hub {repo}: the hub refused it ({err}); the export is in {folder}") from None
    except Exception as err:  # no answer: the HTTP client's connect/DNS/timeout errors, whatever its library
        raise ExportError(
            f"--push-to-hub {repo}: the hub is unreachable ({type(err).__name__}: {err}); the export is in "
            f"{folder}, upload it later from a machine with network access"
        ) from None
    return str(url)


__all__ = ["ExportError", "ModelLoadError", "check_hub_token", "export_merged", "push_to_hub"]
