"""Load a job config: YAML file, then `a.b=value` overrides, then pydantic validation.

Errors come out as ConfigError naming the offending key, before any Ray work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err})") from None
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def describe_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def build_config(cls: type[T], data: dict, overrides: list[str] = ()) -> T:
    """Validate `data` plus overrides into `cls`, raising ConfigError with every bad key listed."""
    data = dict(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__}:\n{describe_errors(err)}") from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read YAML at `path` (or start from defaults when None), apply overrides, validate."""
    data = read_yaml(path) if path else {}
    return build_config(cls, data, overrides)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
