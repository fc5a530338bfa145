"""The two floors: mistral_qa/ never imports a job, and a job's config schema loads without torch (no Ray)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = {"train", "serve", "batch", "cluster", "benchmarks"}


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every absolute import in `path` (relative imports stay inside their package)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_shared_package_imports_no_job():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & JOBS)
        for path in sorted((ROOT / "mistral_qa").rglob("*.py"))
        if imported_roots(path) & JOBS
    }
    assert offenders == {}


@pytest.mark.parametrize("module", ["batch.config", "train.config", "mistral_qa.engine.config"])
def test_a_config_schema_loads_without_torch(module):
    """The CLIs validate their config, and refuse a bad one, before the model stack (torch) is imported."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_batch_driver_checks_the_model_without_torch(tmp_path):
    """The batch job's driver checks that the base model's tokenizer can be found before Ray starts, and
    never imports torch or transformers for it (they cost its start-up seconds; the actors load them)."""
    code = (
        "import sys\n"
        "from batch.config import BatchJobConfig\n"
        "from batch.pipeline import check_model\n"
        "check_model(BatchJobConfig(model={'source': 'random', 'name': 'mistral-7b'}))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
