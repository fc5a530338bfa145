"""What every job's command line shares: logging, exit codes, and one-line errors without tracebacks.

Each job keeps `main(argv) -> int` (mistral_qa.cli calls it) and hands its body to `run_main`:

    def main(argv: list[str] | None = None) -> int:
        args = parse_args(argv)
        return run_main(lambda: train(args), job_errors)

Exit status: 0 done; 2 a bad config, flag or override (ConfigError); 1 one of the job's own errors
(input, model, cluster unusable), found before or while it runs; a job may return codes of its own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pydantic import BaseModel

from .configio import ConfigError, dump_config

CONFIG_ERROR = 2
JOB_ERROR = 1

# What the user typed to start the job, for its --help and usage lines: the `mistral-qa` command sets
# it ("mistral-qa train"); otherwise each job names its `python -m` form.
invoked_as: str | None = None


def prog(module_form: str) -> str:
    """The program name a job's argument parser shows: `mistral-qa <job>` or `python -m <job>`."""
    return invoked_as or module_form


def report(error: Exception | str, code: int) -> int:
    """Print `error: ...` on stderr and return `code` (the exit status)."""
    print(f"error: {error}", file=sys.stderr)
    return code


def print_config(cfg: BaseModel) -> int:
    """--print-config: the resolved config as YAML on stdout."""
    print(dump_config(cfg), end="")
    return 0


def run_main(body: Callable[[], int], job_errors: Callable[[], tuple[type[Exception], ...]] = tuple) -> int:
    """Run a job's body with logging set up; a ConfigError exits 2, one of `job_errors()` exits 1, each
    as one line on stderr. Anything else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return body()
    except ConfigError as err:
        return report(err, CONFIG_ERROR)
    except Exception as err:
        # A job's error types are asked for only now: importing them pulls in Ray or torch, which a bad
        # config must not wait for.
        if isinstance(err, job_errors()):
            return report(err, JOB_ERROR)
        raise
