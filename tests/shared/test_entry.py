"""The command-line wrapper every job's main uses: exit codes and one-line errors (no Ray)."""

from __future__ import annotations

import pytest

from mistral_qa.configio import ConfigError
from mistral_qa.entry import run_main


class JobError(RuntimeError):
    pass


def fails_with(error: Exception):
    def body() -> int:
        raise error

    return body


def test_exit_codes_and_one_line_errors(capsys):
    assert run_main(lambda: 0) == 0
    assert run_main(lambda: 3) == 3  # a job's own status passes through
    assert run_main(fails_with(ConfigError("run.name: unknown key")), lambda: (JobError,)) == 2
    assert capsys.readouterr().err == "error: run.name: unknown key\n"
    assert run_main(fails_with(JobError("no GPUs")), lambda: (JobError,)) == 1
    assert capsys.readouterr().err == "error: no GPUs\n"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError):
        run_main(fails_with(KeyError("bug")), lambda: (JobError,))


def test_the_jobs_error_types_are_asked_for_only_when_an_error_comes():
    asked = []
    assert run_main(lambda: 0, lambda: asked.append(1) or (JobError,)) == 0
    assert asked == []
