"""The `mistral-qa` console script: one command for the jobs of an installed package.

    mistral-qa train --config train/configs/quickstart.yaml       # = python -m train ...
    mistral-qa export --adapter outputs/quickstart/adapter --out merged   # = python -m train.export ...
    mistral-qa serve --adapter outputs/quickstart/adapter         # = python -m serve ...
    mistral-qa batch --config batch/configs/quickstart.yaml ...   # = python -m batch ...
    mistral-qa cluster start --workers 1                          # = python -m cluster.local_cluster ...

Everything after the command goes to that job's own parser (`mistral-qa train --help` shows its flags).
In a checkout, `python -m train` etc. run the same code; installed, the jobs live under mistral_qa
(mistral_qa.train, mistral_qa.serve, ...), and `mistral-qa configs DIR` copies the packaged configs
out so that `--config` has files to read.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

from . import entry

# command -> (module under mistral_qa whose main(argv) -> int runs it, one-line help). Each module is
# imported only when its command runs: serving must not import training's dependencies.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train.__main__", "fine-tune a LoRA adapter with Ray Train (python -m train)"),
    "export": ("train.export", "merge an adapter into its base model (python -m train.export)"),
    "serve": ("serve.__main__", "the OpenAI-compatible chatbot on Ray Serve (python -m serve)"),
    "batch": ("batch.__main__", "batch Q&A with Ray Data, Parquet out (python -m batch)"),
    "cluster": ("cluster.local_cluster", "a local multi-node Ray cluster (python -m cluster.local_cluster)"),
}
# The configs the package carries, by the folder a checkout has them in.
CONFIG_FILES = ("train/configs/*.yaml", "batch/configs/*.yaml", "serve/config.yaml", "cluster/*.yaml")
PACKAGE = Path(__file__).resolve().parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mistral-qa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # add_help=False: --help belongs to the job's own parser, which gets every argument after the name.
        sub.add_parser(name, help=help_text, add_help=False)
    configs = sub.add_parser("configs", help="copy the packaged configs into DIR (train/configs/... under it)")
    configs.add_argument("dir", type=Path, help="folder to write into (created; existing files are kept)")
    return p


def packaged_configs() -> list[tuple[Path, str]]:
    """(file, path relative to a checkout's root) for every config the package carries."""
    found = []
    for pattern in CONFIG_FILES:
        folder, _, glob = pattern.rpartition("/")
        found += [(f, f"{folder}/{f.name}") for f in sorted((PACKAGE / folder).glob(glob))]
    if not found:  # mistral_qa imported from a checkout: the configs sit beside it, not inside it
        root = PACKAGE.parent
        for pattern in CONFIG_FILES:
            found += [(f, str(f.relative_to(root))) for f in sorted(root.glob(pattern))]
    return found


def copy_configs(dest: Path) -> int:
    """Copy the packaged configs under dest with the checkout's relative paths, never overwriting."""
    kept = []
    for source, relative in packaged_configs():
        target = dest / relative
        if target.exists():
            kept.append(relative)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        print(target)
    for relative in kept:
        print(f"kept (exists): {dest / relative}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["configs"]:
        return copy_configs(parser().parse_args(argv).dir)
    args, rest = parser().parse_known_args(argv[:1])  # only the command: the rest is the job's
    module = job_module(COMMANDS[args.command][0])
    entry.invoked_as = f"mistral-qa {args.command}"  # the job's --help says how it was started
    return module.main(rest + argv[1:])


def job_module(name: str):
    """mistral_qa.<name> as installed; in a checkout without an install, the top-level job folder."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as err:
        job = f"{__package__}.{name.partition('.')[0]}"
        if err.name != job:  # a missing dependency, or a module inside the job: not ours to hide
            raise
        return importlib.import_module(name)


if __name__ == "__main__":
    sys.exit(main())
