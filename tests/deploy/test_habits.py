"""The repository's habits hold together (fast): CI lints before it tests, and pre-commit runs the
ruff that pyproject pins (and the venv has), so a commit that passes the hook passes `make lint`."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
RUFF_HOOKS = "https://github.com/astral-sh/ruff-pre-commit"


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith("make ")]


def ruff_hooks() -> dict:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    [repo] = [r for r in config["repos"] if r["repo"] == RUFF_HOOKS]
    return repo


def test_ci_lints_first_then_tests():
    assert ci_commands() == ["make lint", "make test"]


def test_make_lint_builds_the_venv_and_runs_both_ruff_checks():
    # -n: print what make would run without running it; -W: as if pyproject.toml had changed, so the
    # venv build shows whether or not this checkout's venv is up to date (as on a fresh clone).
    dry = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "lint"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "-m venv .venv" in dry
    assert ".venv/bin/ruff check ." in dry and ".venv/bin/ruff format --check ." in dry


def test_pre_commit_runs_ruff_check_with_fix_and_ruff_format():
    hooks = {h["id"]: h for h in ruff_hooks()["hooks"]}
    assert set(hooks) == {"ruff-check", "ruff-format"}
    assert "--fix" in hooks["ruff-check"].get("args", [])


def test_ruff_is_pinned_once_for_ci_and_pre_commit():
    """An unpinned ruff would let a new release reformat the tree and fail make lint on a fresh clone."""
    rev = ruff_hooks()["rev"]
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    [ruff] = [Requirement(r) for r in dev if Requirement(r).name == "ruff"]
    [spec] = list(ruff.specifier)
    assert spec.operator == "==", f"pyproject's dev extra must pin ruff exactly, not {ruff.specifier}"
    assert rev == f"v{spec.version}", f"pre-commit pins ruff {rev}, pyproject {spec.version}: move them together"
    installed = importlib.metadata.version("ruff")
    assert installed == spec.version, f"the venv has ruff {installed}, pyproject pins {spec.version}: run make setup"
