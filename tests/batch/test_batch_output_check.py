"""The batch job checks its output before answering anything: a file, a folder it cannot make, or a
folder it cannot write to is a one-line error and exit 1 (real local filesystem, no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch.__main__ import main
from batch.output import OutputError, check_output

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "batch" / "configs" / "tiny.yaml"
READ_ONLY = Path("/sys/kernel")  # read-only even for root (the tests may run as root, where chmod binds nothing)


def run_cli(tmp_path: Path, output: str, capsys) -> tuple[int, str]:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Why?"}) + "\n")
    code = main(["--config", str(TINY), "--input", str(questions), "--output", output])
    return code, capsys.readouterr().err


def test_an_output_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "answers").write_text("not a folder")
    code, err = run_cli(tmp_path, str(tmp_path / "answers"), capsys)
    assert code == 1 and err.count("\n") == 1 and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "answers").read_text() == "not a folder"


def test_an_output_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    code, err = run_cli(tmp_path, str(tmp_path / "plain" / "answers"), capsys)
    assert code == 1 and "is not writable" in err and err.count("\n") == 1


@pytest.mark.skipif(not READ_ONLY.is_dir(), reason="needs a read-only /sys")
def test_an_unwritable_output_folder_is_refused_before_answering(tmp_path, capsys):
    code, err = run_cli(tmp_path, str(READ_ONLY), capsys)
    assert code == 1 and "is not writable" in err and err.count("\n") == 1
    with pytest.raises(OutputError, match="is not writable"):
        check_output(str(READ_ONLY / "answers"))


def test_a_missing_output_folder_is_made_and_left_empty(tmp_path):
    check_output(str(tmp_path / "a" / "b"))
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
