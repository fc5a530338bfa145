"""Find a trained LoRA adapter wherever it lives, and read what training recorded beside it.

An adapter location is one of:
    outputs/<run>/adapter                   the folder `python -m train` writes (adapter + tokenizer +
                                            training_config.yaml)
    outputs/ray/<run>/checkpoint_000060     a Ray Train checkpoint folder (holds adapter/)
    s3://bucket/path, gs://bucket/path      either of the above in cloud storage; downloaded once
                                            through pyarrow.fs into <cache_dir>/adapters/
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import yaml

from .model import cache_dir
from .templates import DEFAULT_TEMPLATE, TEMPLATES, PromptTemplate, TemplateError, load_template

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_config.json"
TRAINING_CONFIG = "training_config.yaml"
CHECKPOINT_ADAPTER_DIR = "adapter"
# file:// goes through the same download path as cloud storage, which lets tests exercise it offline.
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "file://")


class AdapterError(RuntimeError):
    """An adapter cannot be found, downloaded or used; the message names the location."""


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_SCHEMES)


def adapter_folder(folder: Path, location: str) -> Path:
    """The folder holding adapter_config.json: `folder` itself or, for a checkpoint, its adapter/."""
    if (folder / ADAPTER_FILE).is_file():
        return folder
    if (folder / CHECKPOINT_ADAPTER_DIR / ADAPTER_FILE).is_file():
        return folder / CHECKPOINT_ADAPTER_DIR
    if not folder.exists():
        raise AdapterError(f"adapter {location!r}: no such folder")
    raise AdapterError(
        f"adapter {location!r}: no {ADAPTER_FILE} in it or in its {CHECKPOINT_ADAPTER_DIR}/ "
        "(expected outputs/<run>/adapter or a Ray Train checkpoint folder)"
    )


def download(location: str) -> Path:
    """Copy a remote adapter folder into the cache once; later calls reuse the copy."""
    import pyarrow.fs as pafs

    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
    target = cache_dir() / "adapters" / key
    if target.is_dir():
        return target
    try:
        fs, path = pafs.FileSystem.from_uri(location.rstrip("/"))
        info = fs.get_file_info(path)
    except Exception as err:  # pyarrow raises several types for bad URIs, credentials and networks
        raise AdapterError(f"adapter {location!r}: cannot open ({err})") from None
    if info.type != pafs.FileType.Directory:
        raise AdapterError(f"adapter {location!r}: no such folder")
    tmp = target.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("downloading adapter %s", location)
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterError(f"adapter {location!r}: download failed ({err})") from None
    try:
        tmp.rename(target)
    except OSError:  # another replica finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_adapter(location: str) -> Path:
    """A local folder holding adapter_config.json for `location` (downloading it if remote)."""
    if is_remote(location):
        return adapter_folder(download(location), location)
    return adapter_folder(Path(location).expanduser().resolve(), location)


def read_training_config(folder: Path) -> dict | None:
    """The run's training_config.yaml beside the adapter, or None (a bare Ray Train checkpoint has none)."""
    path = Path(folder) / TRAINING_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AdapterError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a mapping")
    return data


def template_name(training_config: dict | None) -> str:
    """The prompt template a run trained with: its resolved data.template, else the older top-level
    prompt_template key, else (a bare checkpoint, which records neither) the default, alpaca."""
    if training_config is None:
        return DEFAULT_TEMPLATE
    data = training_config.get("data")
    if isinstance(data, dict) and "template" in data:
        return data["template"]
    return training_config.get("prompt_template", DEFAULT_TEMPLATE)


def check_prompt_template(name: str, training_config: dict | None) -> None:
    """Fail unless the adapter learned a template this package can build prompts with."""
    if training_config is None:
        log.warning("adapter %s has no %s; assuming prompt template %s", name, TRAINING_CONFIG, DEFAULT_TEMPLATE)
        return
    template = template_name(training_config)
    if template not in TEMPLATES:
        raise AdapterError(
            f"adapter {name!r} was trained with prompt template {template!r}, but this code builds "
            f"{' or '.join(repr(t) for t in TEMPLATES)} prompts; answers would not match the fine-tune"
        )


def adapter_template(name: str, training_config: dict | None, tokenizer) -> PromptTemplate:
    """The template adapter `name` learned, over the tokenizer it is served with; AdapterError when
    that tokenizer cannot render it (chat without a chat template)."""
    check_prompt_template(name, training_config)
    try:
        return load_template(template_name(training_config), tokenizer)
    except TemplateError as err:
        raise AdapterError(f"adapter {name!r}: {err}") from None


def adapter_templates(locations: dict[str, str], tokenizer) -> dict[str, PromptTemplate]:
    """The template each adapter (name -> location, as EngineConfig.adapters) answers with, read from
    its training_config.yaml; AdapterError for one that cannot be rendered with `tokenizer`."""
    return {
        name: adapter_template(name, read_training_config(resolve_adapter(location)), tokenizer)
        for name, location in locations.items()
    }
