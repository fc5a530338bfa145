"""Every repository path, `python -m` module and import path the docs name exists (fast; no Ray).

The docs: README.md, BENCHMARKS.md, CONTRIBUTING.md, ARCHITECTURE.md, and the header comments (the
leading `#` lines: the command that runs the file) of the YAML files under train/configs,
batch/configs, serve/, cluster/ and k8s/, subfolders included. A path counts when it starts at one
of the repository's own top-level folders or files (ROOTS), so URLs, s3://, /tmp, outputs/ and
../shared/ are never taken for one; a path holding a placeholder (<run>, {name}, *.yaml) is the
user's choice and is skipped. ARCHITECTURE.md also cites names as `path.py: Name, Other.method`, and
each must be defined at the top level of that file.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "BENCHMARKS.md", "CONTRIBUTING.md", "ARCHITECTURE.md"]
YAML_FOLDERS = ["train/configs", "batch/configs", "serve", "cluster", "k8s"]
ROOTS = (
    "train/ serve/ batch/ cluster/ k8s/ mistral_qa/ benchmarks/ tests/ .ci/ "
    "README.md BENCHMARKS.md CONTRIBUTING.md ARCHITECTURE.md Makefile pyproject.toml LICENSE .pre-commit-config.yaml"
).split()
# Modules the docs run that are not the checkout's: the standard library's and installed tools'.
EXTERNAL_MODULES = {"pytest", "pip", "venv", "ray", "torch.distributed.run", "http.server", "json.tool", "mlflow"}
# Modules a BENCHMARKS.md record ran at an older commit, named there with that commit: a measurement's
# command as it was run, not one to paste today. {module: the commit where it existed}
HISTORICAL_MODULES = {"serve.benchmark": "07a1df8"}

# A run of path characters; placeholders (<>{}*) are kept inside it so such a path can be skipped whole.
# Not after a word, '/', ':' or '.', so the tail of /tmp/x/train/..., s3://b/train/... or ../train is not one.
PATH_RUN = re.compile(r"(?<![\w/:.~$-])\.?[\w<>{}*-][\w.<>{}*/-]*")
MODULE_RUN = re.compile(r"\bpython(?:3(?:\.\d+)?)? -m ([A-Za-z_][\w.]*)")
# An import path as Serve and console scripts take it: package.module:name.
IMPORT_PATH = re.compile(r"\b((?:train|serve|batch|cluster|mistral_qa|benchmarks)(?:\.\w+)+):([A-Za-z_]\w*)")
CITATION = re.compile(r"`([\w./-]+\.py): ([\w.]+(?:, [\w.]+)*)`")


def yaml_headers() -> dict[str, str]:
    """{path: its leading comment lines} for the YAML files of YAML_FOLDERS."""
    headers = {}
    for folder in YAML_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.yaml")):
            lines = []
            for line in path.read_text().splitlines():
                if not line.lstrip().startswith("#"):
                    break
                lines.append(line)
            headers[str(path.relative_to(ROOT))] = "\n".join(lines)
    return headers


def readme_contributing() -> str:
    """README.md's "## Contributing" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Contributing\n") :]
    return section.split("\n## ", 1)[0]


def doc_texts() -> dict[str, str]:
    return {**{name: (ROOT / name).read_text() for name in DOCS}, **yaml_headers()}


def repo_paths(text: str) -> set[str]:
    """The repository paths `text` names: runs that start at one of ROOTS, without placeholders."""
    found = set()
    for match in PATH_RUN.finditer(text):
        path = match.group().rstrip(".,;:)")
        if any(c in path for c in "<>{}*") or "..." in path:
            continue
        if any(path == r.rstrip("/") or path.startswith(r) for r in ROOTS):
            found.add(path)
    return found


def module_exists(module: str, doc: str = "") -> bool:
    if module in EXTERNAL_MODULES or module.split(".")[0] in EXTERNAL_MODULES:
        return True
    if doc == "BENCHMARKS.md" and module in HISTORICAL_MODULES:
        return True
    base = ROOT / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (base / "__main__.py").is_file()


@functools.cache  # each cited file is parsed once, however many of its names are cited
def top_level_names(path: Path) -> dict[str, ast.AST]:
    """Names defined at the top level of a module: functions, classes, assigned constants."""
    names: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({t.id: node for t in targets if isinstance(t, ast.Name)})
    return names


def defined(path: Path, name: str) -> bool:
    """`Name` at the top level of `path`, or `Class.member` (a method or class attribute) in it."""
    head, _, member = name.partition(".")
    node = top_level_names(path).get(head)
    if node is None or not member:
        return node is not None
    if not isinstance(node, ast.ClassDef):
        return False
    for item in node.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == member:
            return True
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id == member:
            return True
    return False


def test_the_extraction_finds_what_it_should_and_skips_what_it_should_not():
    text = (
        "see `tests/engine/test_x.py`, benchmarks/serving.py, (train/configs/quickstart.yaml). "
        "Not these: outputs/<run>/adapter, train/configs/<name>.yaml, s3://bucket/train/x, "
        "/tmp/train/x, ../shared/STYLE.md, ../train/x, https://example.org/k8s/y, serve/*.yaml"
    )
    assert repo_paths(text) == {"tests/engine/test_x.py", "benchmarks/serving.py", "train/configs/quickstart.yaml"}
    assert MODULE_RUN.findall("python -m train --config x; python3 -m benchmarks.serving; python3.11 -m venv") == [
        "train",
        "benchmarks.serving",
        "venv",
    ]
    assert module_exists("train") and module_exists("benchmarks.serving") and module_exists("pytest")
    assert not module_exists("serve.benchmark") and not module_exists("serve.benchmark", "README.md")
    # A historical name is allowed only because it is gone and BENCHMARKS.md names the commit it ran at.
    for module, commit in HISTORICAL_MODULES.items():
        assert module_exists(module, "BENCHMARKS.md") and not module_exists(module)
        assert commit in (ROOT / "BENCHMARKS.md").read_text()
    assert IMPORT_PATH.findall("import_path: serve.app:build_app, not s3://x.y:z") == [("serve.app", "build_app")]


def test_citations_are_checked_against_the_file():
    engine = ROOT / "mistral_qa/engine/core.py"
    assert defined(engine, "Engine") and defined(engine, "Engine.make_request") and defined(engine, "eos_ids")
    assert not defined(engine, "Engine.no_such_method") and not defined(engine, "NoSuchName")
    assert CITATION.findall("`mistral_qa/engine/core.py: Engine, Engine.stream`") == [
        ("mistral_qa/engine/core.py", "Engine, Engine.stream")
    ]


@pytest.mark.parametrize("doc", sorted(doc_texts()))
def test_every_named_path_exists(doc):
    missing = sorted(p for p in repo_paths(doc_texts()[doc]) if not (ROOT / p).exists())
    assert not missing, f"{doc} names paths that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", sorted(doc_texts()))
def test_every_python_m_module_exists(doc):
    missing = sorted({m for m in MODULE_RUN.findall(doc_texts()[doc]) if not module_exists(m, doc)})
    assert not missing, f"{doc} runs `python -m` modules that do not exist: {missing}"


@pytest.mark.parametrize("doc", sorted(doc_texts()))
def test_every_import_path_names_a_definition(doc):
    wrong = []
    for module, name in set(IMPORT_PATH.findall(doc_texts()[doc])):
        path = ROOT / (module.replace(".", "/") + ".py")
        if not (path.is_file() and defined(path, name)):
            wrong.append(f"{module}:{name}")
    assert not wrong, f"{doc} names import paths that do not exist: {sorted(wrong)}"


def test_architecture_citations_name_what_the_files_define():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    # A citation in another shape would be skipped unchecked: refuse it instead.
    malformed = [m for m in re.findall(r"`[^`]*\.py:[^`]*`", text) if not CITATION.fullmatch(m)]
    assert not malformed, f"write citations as `path.py: Name, Class.method` on one line: {malformed}"
    citations = CITATION.findall(text)
    assert len(citations) >= 20, "ARCHITECTURE.md cites its names as `path.py: Name, Other`"
    wrong = []
    for path, names in citations:
        if not (ROOT / path).is_file():
            wrong.append(f"{path} (no such file)")
            continue
        wrong += [f"{path}: {name}" for name in names.split(", ") if not defined(ROOT / path, name)]
    assert not wrong, f"ARCHITECTURE.md cites names its files do not define: {wrong}"


def test_the_style_is_written_in_the_repository():
    """The house style lives in CONTRIBUTING.md, not in a file outside the checkout."""
    citing = [name for name, text in doc_texts().items() if "STYLE.md" in text]
    assert not citing, f"these docs point at a style file outside the repository: {citing}"
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    assert "## Style" in contributing and "## House rules" in contributing
    assert "CONTRIBUTING.md" in readme_contributing() and "ARCHITECTURE.md" in readme_contributing()
