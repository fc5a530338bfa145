"""What `pip install .` puts into site-packages, and that the installed package runs (issue 17).

The wheel is built for real (setuptools, as pip builds it) from a copy of the sources, so the checkout
gets no build/ folder; it is installed with `pip install --target` and run from a folder that is not
the checkout, so nothing can come from the checkout's own train/, serve/, batch/. The dependencies come
from the test venv's site-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "mistral_qa", "train", "serve", "batch", "cluster"]
JOBS = ["train", "serve", "batch", "cluster"]
TRAINING_ONLY = {"deepspeed", "bitsandbytes", "matplotlib"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("mistral_qa-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    return target


# Runs mistral_qa.cli.main for each argv of argv[1] (JSON) in one interpreter (one torch import, not
# one per command). After `batch --help` it imports the serving and batch code paths and records every
# top-level module loaded so far: nothing of training may be among them.
RUN_COMMANDS = """
import contextlib, io, json, sys
import mistral_qa.cli as cli
results, serving = [], []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
    results.append([code, out.getvalue(), err.getvalue()])
    if argv == ["batch", "--help"]:
        import mistral_qa.serve.app, mistral_qa.batch.pipeline, mistral_qa.engine.core
        serving = sorted({m.split(".")[0] for m in sys.modules})
files = [sys.modules[m].__file__ for m in ("mistral_qa.cli", "mistral_qa.train.__main__", "mistral_qa.serve.app")]
print(json.dumps({"results": results, "serving": serving, "files": files}))
"""


def run_installed(target: Path, cwd: Path, commands: list[list[str]]) -> dict:
    """`mistral-qa ARGV` for each of commands, in one process with only the installed copy on the path
    (PYTHONPATH; the venv's site-packages give the dependencies), from cwd."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    command = [sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_wheel_holds_one_top_level_package_with_the_jobs_inside(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mistral_qa", "mistral_qa-0.1.0.dist-info"}
    for job in JOBS:
        assert f"mistral_qa/{job}/__init__.py" in names
    for module in [
        "train/__main__.py",
        "train/export.py",
        "serve/app.py",
        "batch/__main__.py",
        "cli.py",
        "engine/core.py",
    ]:
        assert f"mistral_qa/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read("mistral_qa-0.1.0.dist-info/entry_points.txt").decode()
    assert "mistral-qa = mistral_qa.cli:main" in entry_points


def test_the_wheel_carries_the_configs_the_static_page_and_the_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [
        *ROOT.glob("train/configs/*.yaml"),
        *ROOT.glob("batch/configs/*.yaml"),
        *ROOT.glob("cluster/*.yaml"),
        *ROOT.glob("serve/static/*"),
        ROOT / "serve" / "config.yaml",
    ]
    wanted = {f"mistral_qa/{p.relative_to(ROOT)}" for p in data}
    wanted |= {f"mistral_qa/assets/{p.name}" for p in (ROOT / "mistral_qa" / "assets").iterdir()}
    assert len(wanted) > 10 and wanted <= names, sorted(wanted - names)


def test_the_installed_package_runs_every_command_outside_the_checkout(installed, tmp_path):
    packaged = str(installed / "mistral_qa" / "train" / "configs" / "quickstart.yaml")
    commands = [
        ["--help"],
        ["serve", "--help"],
        ["batch", "--help"],
        ["export", "--help"],
        ["train", "--help"],
        ["train", "--config", packaged, "--print-config"],  # the packaged config, read where it lies
        ["configs", "here"],  # or copied out, then used by the checkout's relative paths
        ["batch", "--config", "here/batch/configs/tiny.yaml", "--print-config"],
        ["train", "--config", packaged, "optim.nme=adamw_torch"],
        ["fly"],
    ]
    report = run_installed(installed, tmp_path, commands)
    assert all(Path(f).is_relative_to(installed) for f in report["files"]), report["files"]
    results = dict(zip(map(" ".join, commands), report["results"]))
    for command, wanted in [
        ("--help", "mistral-qa"),
        ("serve --help", "usage: mistral-qa serve"),  # each job's usage names the command that ran it
        ("serve --help", "--adapter"),
        ("batch --help", "usage: mistral-qa batch"),
        ("batch --help", "--input"),
        ("export --help", "usage: mistral-qa export"),
        ("export --help", "--out"),
        ("train --help", "usage: mistral-qa train"),
        ("train --help", "--ask"),
        (f"train --config {packaged} --print-config", "source: builtin:mobile_health"),
        ("batch --config here/batch/configs/tiny.yaml --print-config", "engine:"),
    ]:
        code, out, err = results[command]
        assert code == 0 and wanted in out, (command, err[-2000:])
    assert (tmp_path / "here" / "serve" / "config.yaml").is_file()
    assert (tmp_path / "here" / "train" / "configs" / "quickstart.yaml").is_file()
    code, _, err = results[f"train --config {packaged} optim.nme=adamw_torch"]
    assert code == 2 and "optim.nme" in err and "Traceback" not in err
    code, _, err = results["fly"]
    assert code == 2 and "invalid choice: 'fly'" in err
    # A serving-only install has no deepspeed, bitsandbytes or matplotlib: serve and batch never import them.
    assert "torch" in report["serving"] and not TRAINING_ONLY & set(report["serving"])


def test_the_core_dependencies_leave_training_to_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name for r in project["dependencies"]}
    assert not TRAINING_ONLY & core
    extras = project["optional-dependencies"]
    names = {extra: {Requirement(r).name for r in reqs} for extra, reqs in extras.items()}
    assert "deepspeed" in names["deepspeed"] and "bitsandbytes" in names["qlora"] and "matplotlib" in names["train"]
    # dev (what make setup installs for the tests and the quickstart) pulls in every extra
    assert "mistral-qa[all]" in extras["dev"] and extras["all"] == ["mistral-qa[train,deepspeed,qlora,tracking]"]


def test_the_paged_optimiser_without_bitsandbytes_is_refused_by_name(monkeypatch):
    from mistral_qa.configio import ConfigError
    from train.config import OptimizerConfig
    from train.optim import build_optimizer, check_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(ConfigError, match=r"optim.name=paged_adamw_32bit .*mistral-qa\[qlora\]"):
        check_optimizer(OptimizerConfig(name="paged_adamw_32bit"))
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(OptimizerConfig(name="paged_adamw_32bit"), [], on_cuda=False)
    check_optimizer(OptimizerConfig(name="adamw_torch"))  # needs nothing beyond torch


def test_training_without_the_qlora_extra_stops_before_any_work(monkeypatch, tmp_path, capsys):
    """python -m train with the paged optimiser on an install without bitsandbytes: exit 2 and one line
    naming optim.name and the extra, before tracking, data or Ray (no Ray Train worker retries)."""
    from train.__main__ import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    out = ["optim.name=paged_adamw_32bit", f"run.output_dir={tmp_path}/out", f"run.storage_path={tmp_path}/ray"]
    assert main(["--config", str(ROOT / "train" / "configs" / "tiny.yaml"), *out]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [line for line in errors if line.startswith("error: optim.name=paged_adamw_32bit needs")]
    assert len(errors) == 1 and "mistral-qa[qlora]" in errors[0]
    assert not list(tmp_path.iterdir())  # nothing written: no run folder, no Ray storage
