"""Answer outputs: the fixed Parquet schema, atomic file writes, resume ids, reading answers back.

Every output file is complete or absent: on a local disk it is written under a hidden temp name
('.part-….parquet.tmp-…') and renamed; on s3:// / gs:// an object appears only once its upload
finishes. Readers look at visible '*.parquet' files only (pyarrow, pandas and Ray Data skip names
starting with '.' or '_'), so a job killed halfway leaves nothing half-written in view, and a rerun
finds exactly the ids already answered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from mistral_qa.sampling import SamplingSettings

from .io import resolve_filesystem

# The documented output schema (README.md, "Batch Q&A"); explicit types so an all-null column in the first
# files (e.g. error) never changes the schema (ray PR #60572).
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("adapter", pa.string()),
        pa.field("max_tokens", pa.int64()),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("top_k", pa.int64()),
        pa.field("presence_penalty", pa.float64()),
        pa.field("frequency_penalty", pa.float64()),
        pa.field("stop", pa.list_(pa.string())),
        pa.field("structured", pa.string()),
        pa.field("error", pa.string()),
    ]
)
TEMP_MARK = ".tmp-"


def setting_columns(settings: SamplingSettings) -> dict:
    """The output columns that record how a row was generated: every setting that changes the text;
    `structured` as its JSON (null for free text)."""
    values = settings.model_dump()
    structured = values.pop("structured")
    return {**values, "structured": None if structured is None else json.dumps(structured, sort_keys=True)}


class OutputError(RuntimeError):
    """The output folder cannot be used as asked (not writable, a file, or mode=error and it holds answers)."""


def is_answer_file(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.endswith(".parquet") and not base.startswith((".", "_"))


def _listing(fs, path: str) -> list:
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File]


def answer_files(uri: str) -> list[str]:
    """Visible answer files in the output folder, sorted (oldest run first: names start with the run time)."""
    fs, path = resolve_filesystem(uri)
    return sorted(i.path for i in _listing(fs, path) if is_answer_file(i.path))


def remove_stale_temp_files(uri: str) -> int:
    """Delete temp files a killed run left behind; no other job may be writing to the same output."""
    fs, path = resolve_filesystem(uri)
    stale = [i.path for i in _listing(fs, path) if TEMP_MARK in PurePosixPath(i.path).name]
    for name in stale:
        fs.delete_file(name)
    return len(stale)


def read_done_ids(uri: str) -> pa.Array:
    """The ids already in the output (one string array; only the id column is read)."""
    fs, _ = resolve_filesystem(uri)
    chunks = [pq.read_table(p, columns=["id"], filesystem=fs).column("id") for p in answer_files(uri)]
    if not chunks:
        return pa.array([], pa.string())
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], pa.string()).combine_chunks()


def check_output(uri: str) -> None:
    """Fail now, not after the answering, when the output cannot be written: it must be a folder (made
    here if missing) that takes a new file. The probe goes through the filesystem the writes use, so
    a local disk and s3:// / gs:// are checked alike."""
    try:
        fs, path = resolve_filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise OutputError(f"output {uri!r} is a file; give a folder (output.path / --output)")
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"probe")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException, ValueError) as err:
        raise OutputError(f"output {uri!r} is not writable: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def prepare_output(uri: str, mode: str) -> pa.Array:
    """Apply output.mode, clear stale temp files; returns the ids to skip (empty unless resuming)."""
    fs, path = resolve_filesystem(uri)
    existing = answer_files(uri)
    if existing and mode == "error":
        raise OutputError(f"output {uri!r} already holds {len(existing)} answer files (output.mode=error)")
    if mode == "overwrite":
        for name in existing:
            fs.delete_file(name)
    remove_stale_temp_files(uri)
    fs.create_dir(path, recursive=True)
    return read_done_ids(uri) if mode == "resume" else pa.array([], pa.string())


def file_stats(table: pa.Table) -> dict:
    """What one written file adds to the job summary."""
    errors = [e.split(":", 1)[0] for e in table.column("error").to_pylist() if e is not None]
    return {
        "rows": table.num_rows,
        "files": 1,
        "completion_tokens": int(pc.sum(table.column("completion_tokens")).as_py() or 0),
        "errors": Counter(errors),
    }


def write_atomically(fs, table: pa.Table, final: str, local: bool) -> None:
    """Write `table` so that `final` is either absent or complete."""
    if not local:  # object stores publish an object only when its upload completes
        pq.write_table(table, final, filesystem=fs)
        return
    parent, name = final.rpartition("/")[::2]
    temp = f"{parent}/.{name}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    pq.write_table(table, temp, filesystem=fs)
    fs.move(temp, final)  # a rename: atomic on one local filesystem


class AnswerDatasink(Datasink[dict]):
    """One Parquet file per write task (about output.rows_per_file rows), written atomically.

    File names carry the run's start time, a run token and the write task index, so a retried write
    task replaces its own file rather than adding a duplicate, and runs never collide.
    """

    def __init__(self, uri: str, rows_per_file: int):
        self.uri = uri
        self.rows_per_file = rows_per_file
        self.run_token = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.stats: dict = {"rows": 0, "files": 0, "completion_tokens": 0, "errors": Counter()}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WriteAnswers"

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "files": 0, "completion_tokens": 0, "errors": Counter()}
        table = pa.concat_tables(tables)
        fs, path = resolve_filesystem(self.uri)
        final = f"{path}/part-{self.run_token}-{ctx.task_idx:06d}.parquet"
        write_atomically(fs, table, final, local=isinstance(fs, pafs.LocalFileSystem))
        return file_stats(table)

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        for item in write_result.write_returns:
            for key in ("rows", "files", "completion_tokens"):
                self.stats[key] += item[key]
            self.stats["errors"].update(item["errors"])


def conform(table: pa.Table) -> pa.Table:
    """`table` in OUTPUT_SCHEMA: files of earlier versions lack the newer setting columns (read as null)."""
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in OUTPUT_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA)


def read_answers(uri: str, limit: int | None = None) -> pa.Table:
    """Answer rows from the output (the first `limit`, in file order); reads whole files only as needed."""
    fs, _ = resolve_filesystem(uri)
    tables, rows = [], 0
    for name in answer_files(uri):
        table = conform(pq.read_table(name, filesystem=fs))
        tables.append(table)
        rows += table.num_rows
        if limit is not None and rows >= limit:
            break
    table = pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()
    return table if limit is None else table.slice(0, limit)
