"""k8s/Dockerfile installs exact versions, each inside what pyproject.toml allows, and the torch the
CPU tests run (the Makefile's pin)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pip_installs(text: str) -> list[str]:
    """The package arguments of every `pip install` in a Dockerfile or Makefile (options and `.` left out)."""
    joined = text.replace("\\\n", " ")
    found = []
    for command in re.findall(r"pip install ([^&\n]*)", joined):
        found += [a for a in shlex.split(command.split("#")[0]) if not a.startswith("-") and a not in (".",)]
    return [a for a in found if not a.startswith(("$", '".[', ".["))]


def allowed() -> dict[str, Requirement]:
    """Every requirement pyproject.toml states: core, build system and each extra (the image installs
    them all); an extra's reference to the project itself (mistral-qa[train]) is no pin to check."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = [r for reqs in project["project"]["optional-dependencies"].values() for r in reqs]
    names = [*project["project"]["dependencies"], *project["build-system"]["requires"], *extras]
    requirements = [r for r in map(Requirement, names) if canonicalize_name(r.name) != "mistral-qa"]
    return {canonicalize_name(r.name): r for r in requirements}


def test_the_image_pins_exact_versions_inside_pyproject_ranges():
    pins = [Requirement(a) for a in pip_installs((ROOT / "k8s" / "Dockerfile").read_text())]
    assert pins, "no pip install found in k8s/Dockerfile"
    ranges = allowed()
    for pin in pins:
        specs = list(pin.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"k8s/Dockerfile: {pin} is not an exact pin"
        version = specs[0].version
        name = canonicalize_name(pin.name)
        if name in ranges:
            assert ranges[name].specifier.contains(version), f"{pin} is outside pyproject.toml's {ranges[name]}"


def test_the_image_and_the_tests_install_the_same_torch():
    image = {canonicalize_name(Requirement(a).name): a for a in pip_installs((ROOT / "k8s" / "Dockerfile").read_text())}
    make = {canonicalize_name(Requirement(a).name): a for a in pip_installs((ROOT / "Makefile").read_text())}
    assert image["torch"] == make["torch"]


def test_the_parser_sees_an_unpinned_install():
    assert pip_installs('RUN pip install --no-cache-dir "torch>=2.5" wheel \\\n && pip install -e ".[dev]"') == [
        "torch>=2.5",
        "wheel",
    ]


def test_the_image_installs_every_extra_and_runs_the_checkout():
    """GPU pods train (deepspeed, qlora) as well as serve, and RayService's import_path serve.app:build_app
    must resolve in every Ray worker: pip installs the jobs only under mistral_qa, so the image puts
    its checkout (the WORKDIR) on PYTHONPATH."""
    text = (ROOT / "k8s" / "Dockerfile").read_text()
    assert re.search(r'pip install [^\n]*--no-build-isolation "\.\[all\]"', text)
    (workdir,) = re.findall(r"^WORKDIR (\S+)", text, re.MULTILINE)
    assert re.search(rf"^\s*PYTHONPATH={re.escape(workdir)}$", text, re.MULTILINE)
