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
from .prompt import TEMPLATE_NAME

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


def check_prompt_template(name: str, training_config: dict | None) -> None:
    """Fail unless the adapter learned the template this package builds prompts with."""
    if training_config is None:
        log.warning("adapter %s has no %s; assuming prompt template %s", name, TRAINING_CONFIG, TEMPLATE_NAME)
        return
    template = training_config.get("prompt_template")
    if template != TEMPLATE_NAME:
        raise AdapterError(
            f"adapter {name!r} was trained with prompt_template={template!r}, but this code builds "
            f"{TEMPLATE_NAME!r} prompts; answers would not match the fine-tune"
        )
