"""Batch job inputs and outputs without Ray: formats, stable ids, bad rows, atomic files, resume ids."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.config import BatchJobConfig, InputSettings
from batch.io import InputError, check_question_column, format_of, list_inputs, open_input, read_rows
from batch.output import (
    OUTPUT_SCHEMA,
    AnswerDatasink,
    OutputError,
    answer_files,
    prepare_output,
    read_answers,
    read_done_ids,
)
from mistral_qa.configio import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
BATCH_CONFIGS = sorted((ROOT / "batch" / "configs").glob("*.yaml"))


def read_all(spec: str, **settings) -> list[dict]:
    """Every INPUT_SCHEMA row of an input spec, read the way a Ray Data read task does."""
    cfg = InputSettings(**settings)
    files = list_inputs(spec, cfg.format)
    rows = []
    for path in files.paths:
        with open_input(files, path, format_of(path, cfg.format)) as stream:
            rows += [r for t in read_rows(stream, path, files.root, cfg) for r in t.to_pylist()]
    return rows


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --- configs ---------------------------------------------------------------------------------------


def test_batch_configs_exist():
    assert {p.name for p in BATCH_CONFIGS} >= {"tiny.yaml", "quickstart.yaml", "mistral7b.yaml"}


@pytest.mark.parametrize("path", BATCH_CONFIGS, ids=lambda p: p.name)
def test_every_batch_yaml_loads_and_starts_with_its_command(path):
    load_config(BatchJobConfig, path)
    assert path.read_text().splitlines()[0].startswith(f"# python -m batch --config batch/configs/{path.name}")


def test_gpu_config_asks_for_one_gpu_per_actor():
    cfg = load_config(BatchJobConfig, ROOT / "batch/configs/mistral7b.yaml")
    assert cfg.compute.num_gpus_per_actor == 1 and cfg.model.name == "mistralai/Mistral-7B-v0.1"


@pytest.mark.parametrize(
    "override, key",
    [
        ("input.colum=q", "input.colum: unknown key"),
        ("compute.num_actors=0", "compute.num_actors"),
        ("model=null", "model"),
    ],
)
def test_bad_batch_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(BatchJobConfig, ROOT / "batch/configs/tiny.yaml", [override])


# --- formats and ids ------------------------------------------------------------------------------


def test_jsonl_ids_come_from_the_id_column_else_file_and_line(tmp_path):
    write_jsonl(
        tmp_path / "q.jsonl", [{"id": "a", "question": "one?"}, {"question": "two?"}, "", {"id": 7, "question": "x"}]
    )
    rows = read_all(str(tmp_path / "q.jsonl"))
    assert [r["id"] for r in rows] == ["a", "q.jsonl:2", "7"]  # the blank line 3 is skipped but counted
    assert [r["question"] for r in rows] == ["one?", "two?", "x"]
    assert all(r["error"] is None for r in rows)


def test_ids_are_stable_across_reruns_and_path_spellings(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "q.jsonl", [{"question": f"q{i}"} for i in range(5)])
    first = read_all(str(tmp_path / "q.jsonl"), id_column=None)
    monkeypatch.chdir(tmp_path)
    again = read_all("q.jsonl", id_column=None)
    assert [r["id"] for r in first] == [r["id"] for r in again] == [f"q.jsonl:{i}" for i in range(1, 6)]


def test_folder_input_ids_hold_the_path_inside_the_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl", [{"question": "a?"}])
    (tmp_path / "b.txt").write_text("b?\n\nc?\n")
    (tmp_path / "_SUCCESS").write_text("")
    write_jsonl(tmp_path / ".hidden.jsonl", [{"question": "no"}])
    (tmp_path / "notes.md").write_text("not questions")
    rows = read_all(str(tmp_path))
    assert [(r["id"], r["question"]) for r in rows] == [("b.txt:1", "b?"), ("b.txt:3", "c?"), ("sub/a.jsonl:1", "a?")]


def test_glob_star_stays_in_its_folder_and_double_star_crosses(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "sub/b.jsonl"):
        write_jsonl(tmp_path / name, [{"question": "q"}])
    assert [Path(p).name for p in list_inputs(str(tmp_path / "*.jsonl")).paths] == ["a.jsonl"]
    assert [Path(p).name for p in list_inputs(str(tmp_path / "**/*.jsonl")).paths] == ["a.jsonl", "b.jsonl"]


def test_csv_with_quoted_multiline_fields_and_a_custom_question_column(tmp_path):
    (tmp_path / "q.csv").write_text('key,text\nk1,"line one\nline two"\nk2,plain\n')
    rows = read_all(str(tmp_path / "q.csv"), question_column="text", id_column="key")
    assert [(r["id"], r["question"]) for r in rows] == [("k1", "line one\nline two"), ("k2", "plain")]


def test_parquet_rows_are_numbered_and_typed_columns_checked(tmp_path):
    pq.write_table(pa.table({"question": ["a?", None, "c?"], "n": [1, 2, 3]}), tmp_path / "q.parquet")
    pq.write_table(pa.table({"question": [1, 2]}), tmp_path / "ints.parquet")
    rows = read_all(str(tmp_path), id_column=None)
    assert [(r["id"], (r["error"] or "").split(":")[0]) for r in rows] == [
        ("ints.parquet:1", "non_text"),
        ("ints.parquet:2", "non_text"),
        ("q.parquet:1", ""),
        ("q.parquet:2", "missing_question"),
        ("q.parquet:3", ""),
    ]


def test_a_byte_order_mark_does_not_hide_the_first_row_or_column(tmp_path):
    (tmp_path / "q.csv").write_bytes(b"\xef\xbb\xbfquestion,id\nfirst?,a\n")
    (tmp_path / "q.jsonl").write_bytes(b'\xef\xbb\xbf{"question": "second?"}\n')
    rows = read_all(str(tmp_path))
    assert [(r["id"], r["question"], r["error"]) for r in rows] == [
        ("a", "first?", None),
        ("q.jsonl:1", "second?", None),
    ]


def test_compressed_jsonl_is_read(tmp_path):
    with gzip.open(tmp_path / "q.jsonl.gz", "wt") as f:
        f.write(json.dumps({"question": "zipped?"}) + "\n")
    assert [r["question"] for r in read_all(str(tmp_path / "q.jsonl.gz"))] == ["zipped?"]


def test_bad_rows_keep_their_place_and_get_an_error(tmp_path):
    path = tmp_path / "q.jsonl"
    write_jsonl(
        path, ["{not json", "[1, 2]", {"question": 42}, {"question": "   "}, {"other": "x"}, {"question": "ok?"}]
    )
    with open(path, "ab") as f:
        f.write(b'{"question": "\xff\xfe"}\n')
    (tmp_path / "bad.csv").write_text('question\nfine\n"a","b"\n')
    kinds = {r["id"]: (r["error"] or "").split(":")[0] for r in read_all(str(tmp_path))}
    assert kinds == {
        "q.jsonl:1": "unreadable",
        "q.jsonl:2": "unreadable",
        "q.jsonl:3": "non_text",
        "q.jsonl:4": "empty_question",
        "q.jsonl:5": "missing_question",
        "q.jsonl:6": "",
        "q.jsonl:7": "unreadable",
        "bad.csv:1": "",
        "bad.csv:2": "unreadable",
    }


def test_missing_input_and_misnamed_question_column_fail_before_the_job(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match="no question files"):
        list_inputs(str(tmp_path))
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x"}])
    with pytest.raises(InputError, match="no 'question' column"):
        check_question_column(list_inputs(str(tmp_path / "q.jsonl")), InputSettings())


# --- outputs --------------------------------------------------------------------------------------


def answer_table(ids: list[str], error: str | None = None) -> pa.Table:
    row = dict(question="q", answer="", finish_reason="stop", prompt_tokens=3, completion_tokens=2, model="m")
    row |= dict(adapter=None, max_tokens=8, temperature=0.0, top_p=1.0, seed=None, error=error)
    return pa.Table.from_pylist([{"id": i, **row} for i in ids], schema=OUTPUT_SCHEMA)


def test_datasink_writes_one_complete_file_with_the_fixed_schema(tmp_path):
    sink = AnswerDatasink(str(tmp_path), rows_per_file=10)
    stats = sink.write(
        [answer_table(["a", "b"]), answer_table(["c"], error="too_long: x")], SimpleNamespace(task_idx=3)
    )
    assert stats["rows"] == 3 and stats["errors"] == {"too_long": 1} and stats["completion_tokens"] == 6
    files = answer_files(str(tmp_path))
    assert len(files) == 1 and files[0].endswith("-000003.parquet")
    assert [p.name for p in tmp_path.iterdir()] == [Path(files[0]).name]  # no temp file left
    assert pq.read_schema(files[0]).equals(OUTPUT_SCHEMA)


def test_an_all_null_error_column_keeps_its_string_type(tmp_path):
    sink = AnswerDatasink(str(tmp_path), rows_per_file=10)
    sink.write([answer_table(["a"])], SimpleNamespace(task_idx=0))
    sink.write([answer_table(["b"], error="unreadable: x")], SimpleNamespace(task_idx=1))
    table = read_answers(str(tmp_path))
    assert table.schema.field("error").type == pa.string()
    assert table.column("error").to_pylist() == [None, "unreadable: x"]


def test_resume_ids_ignore_temp_and_foreign_files(tmp_path):
    sink = AnswerDatasink(str(tmp_path), rows_per_file=10)
    sink.write([answer_table(["a", "b"])], SimpleNamespace(task_idx=0))
    pq.write_table(answer_table(["z"]), tmp_path / ".part-x.parquet.tmp-1234")  # a killed run's leftover
    pq.write_table(answer_table(["y"]), tmp_path / "_staging.parquet")
    (tmp_path / "notes.txt").write_text("x")
    assert sorted(read_done_ids(str(tmp_path)).to_pylist()) == ["a", "b"]
    assert sorted(prepare_output(str(tmp_path), "resume").to_pylist()) == ["a", "b"]
    assert not (tmp_path / ".part-x.parquet.tmp-1234").exists()  # stale temp files are cleared


def test_output_modes(tmp_path):
    assert prepare_output(str(tmp_path / "new"), "error").to_pylist() == []
    sink = AnswerDatasink(str(tmp_path), rows_per_file=10)
    sink.write([answer_table(["a"])], SimpleNamespace(task_idx=0))
    with pytest.raises(OutputError, match="already holds 1 answer files"):
        prepare_output(str(tmp_path), "error")
    assert prepare_output(str(tmp_path), "overwrite").to_pylist() == []
    assert answer_files(str(tmp_path)) == []


def test_answer_files_of_the_earlier_schema_read_with_the_new_setting_columns_null(tmp_path):
    """Files written before top_k, penalties, stop and structured were recorded still read (and mix)."""
    sink = AnswerDatasink(str(tmp_path), rows_per_file=10)
    sink.write([answer_table(["new"])], SimpleNamespace(task_idx=0))
    new_columns = {"top_k", "presence_penalty", "frequency_penalty", "stop", "structured"}
    old = answer_table(["old"])
    pq.write_table(old.drop_columns(sorted(new_columns)), tmp_path / "part-0-old.parquet")
    table = read_answers(str(tmp_path))
    assert table.schema.equals(OUTPUT_SCHEMA) and sorted(table.column("id").to_pylist()) == ["new", "old"]
    old_row = next(r for r in table.to_pylist() if r["id"] == "old")
    assert all(old_row[c] is None for c in new_columns)
