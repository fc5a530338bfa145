"""Question inputs: find the files, read them as a Ray Data source, give every row a stable id.

Formats: JSONL (one object a line), CSV (header row), Parquet, plain text (one question a line);
compressed variants (.gz, .bz2, .zst, .lz4) are decompressed. A path is a file, a folder (read
recursively; names starting with '.' or '_' are skipped) or a glob (`*` stays inside a folder, `**`
crosses folders), local or s3:// / gs:// through pyarrow filesystems.

A row's id is the value of the id column when there is one, else '<file>:<n>': the file path relative
to the input root and the 1-based line (JSONL, text) or record (CSV, Parquet) number, so a rerun on the
same input gives the same ids. Rows that cannot be answered keep their id and carry an `error`:

    unreadable        the line/record cannot be parsed (bad JSON, bad UTF-8, wrong CSV field count)
    missing_question  the question column is absent or null
    non_text          the question (or context) is not a string
    empty_question    the question is blank
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.datasource import FileBasedDatasource

from mistral_qa.storage import resolve_filesystem

from .config import InputSettings

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
INPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("context", pa.string()), ("error", pa.string())]
)
ROWS_PER_BLOCK = 1000


class InputError(RuntimeError):
    """The input cannot be used at all (no such path, no question files, no question column)."""


@dataclass(frozen=True)
class InputFiles:
    """The question files of one input spec, and the root their ids are relative to."""

    filesystem: pafs.FileSystem
    root: str
    paths: list[str]


def format_of(path: str, forced: str = "auto") -> str | None:
    """The reader for `path`: `forced` unless auto, else from the extension (compression stripped)."""
    if forced != "auto":
        return forced
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return FORMATS.get(PurePosixPath(name).suffix)


def glob_regex(pattern: str) -> re.Pattern:
    """`*` and `?` within one path component, `**` across components."""
    out = ""
    for part in re.split(r"(\*\*/?|\*|\?)", pattern):
        if part.startswith("**"):
            out += ".*"
        elif part == "*":
            out += "[^/]*"
        elif part == "?":
            out += "[^/]"
        else:
            out += re.escape(part)
    return re.compile(out + r"\Z")


def _listing(fs: pafs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def _hidden(path: str, root: str) -> bool:
    return any(part.startswith((".", "_")) for part in PurePosixPath(relative_path(path, root)).parts)


def relative_path(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1 :] if root and path.startswith(root + "/") else PurePosixPath(path).name


def list_inputs(spec: str, forced_format: str = "auto") -> InputFiles:
    """Expand a file, folder or glob into its question files (sorted), or raise InputError."""
    fs, path = resolve_filesystem(spec)
    wildcard = re.search(r"[*?]", path)
    if wildcard:
        root = path[: wildcard.start()].rpartition("/")[0]
        matcher = glob_regex(path)
        paths = [p for p in _listing(fs, root) if matcher.match(p)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input {spec!r} does not exist")
        if info.type == pafs.FileType.File:
            if not format_of(path, forced_format):
                raise InputError(f"input {spec!r}: unknown extension; set input.format (jsonl, csv, parquet, text)")
            return InputFiles(fs, path.rpartition("/")[0], [path])
        root, paths = path, _listing(fs, path)
    paths = sorted(p for p in paths if not _hidden(p, root) and format_of(p, forced_format))
    if not paths:
        kinds = ", ".join(sorted(FORMATS))
        raise InputError(f"input {spec!r} holds no question files ({kinds}, optionally compressed)")
    return InputFiles(fs, root, paths)


def iter_lines(stream, chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its line ending) from a binary stream, read in chunks."""
    number, rest = 0, b""
    while chunk := stream.read(chunk_size):
        if number == 0 and not rest:
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark, as some editors write
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            yield number, line.removesuffix(b"\r")
    if rest:
        yield number + 1, rest.removesuffix(b"\r")


def parse_jsonl(stream) -> Iterator[tuple[int, dict | str]]:
    """(line number, object or error text); blank lines are skipped but keep their number."""
    for number, line in iter_lines(stream):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            yield number, f"unreadable: line {number} is not valid JSON ({err})"
            continue
        if isinstance(record, dict):
            yield number, record
        else:
            yield number, f"unreadable: line {number} is a JSON {type(record).__name__}, not an object"


def parse_text(stream, column: str) -> Iterator[tuple[int, dict | str]]:
    for number, line in iter_lines(stream):
        if not line.strip():
            continue
        try:
            yield number, {column: line.decode("utf-8")}
        except UnicodeDecodeError as err:
            yield number, f"unreadable: line {number} is not UTF-8 ({err})"


def parse_csv(stream) -> Iterator[tuple[int, dict | str]]:
    """(record number after the header, row or error text); quoted fields may span lines."""
    text = (line.decode("utf-8", "surrogateescape") + "\n" for _, line in iter_lines(stream))
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    number = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            number += 1
            yield number, f"unreadable: record {number} ({err})"
            continue
        if not fields:
            continue
        number += 1
        if len(fields) != len(header):
            yield number, f"unreadable: record {number} has {len(fields)} fields, the header {len(header)}"
        elif any(_has_surrogates(f) for f in fields):
            yield number, f"unreadable: record {number} is not UTF-8"
        else:
            yield number, dict(zip(header, fields, strict=True))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_parquet(source, columns: list[str]) -> Iterator[tuple[int, dict | str]]:
    """(row number, row) over the wanted columns that the file has; batch by batch."""
    import pyarrow.parquet as pq

    pfile = pq.ParquetFile(source)
    present = [c for c in columns if c in pfile.schema_arrow.names]
    number = 0
    for batch in pfile.iter_batches(batch_size=ROWS_PER_BLOCK, columns=present):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def parse_file(stream, fmt: str, settings: InputSettings) -> Iterator[tuple[int, dict | str]]:
    if fmt == "jsonl":
        return parse_jsonl(stream)
    if fmt == "csv":
        return parse_csv(stream)
    if fmt == "text":
        return parse_text(stream, settings.question_column)
    columns = [c for c in (settings.question_column, settings.id_column, settings.context_column) if c]
    return parse_parquet(stream, columns)


def _text_field(record: dict, column: str | None, label: str, required: bool) -> tuple[str | None, str | None]:
    """(value, error) of one text field of a record."""
    value = record.get(column) if column else None
    if value is None:
        return None, (f"missing_question: no {column!r} value" if required else None)
    if not isinstance(value, str):
        return None, f"non_text: {label} is {type(value).__name__}"
    return value, None


def make_row(source: str, number: int, record: dict | str, settings: InputSettings) -> dict:
    """One INPUT_SCHEMA row: stable id, question, context, error (None when answerable)."""
    row_id = f"{source}:{number}"
    if isinstance(record, str):
        return {"id": row_id, "question": None, "context": None, "error": record}
    given = record.get(settings.id_column) if settings.id_column else None
    if given is not None and str(given) != "":
        row_id = str(given)
    question, error = _text_field(record, settings.question_column, "question", required=True)
    context, context_error = _text_field(record, settings.context_column, "context", required=False)
    error = error or context_error
    if error is None and not question.strip():
        error = "empty_question: the question is blank"
    return {"id": row_id, "question": question, "context": context, "error": error}


def read_rows(stream, path: str, root: str, settings: InputSettings) -> Iterator[pa.Table]:
    """INPUT_SCHEMA tables of up to ROWS_PER_BLOCK rows from one open file."""
    source = relative_path(path, root)
    rows = []
    for number, record in parse_file(stream, format_of(path, settings.format), settings):
        rows.append(make_row(source, number, record, settings))
        if len(rows) == ROWS_PER_BLOCK:
            yield pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


class QuestionDatasource(FileBasedDatasource):
    """Ray Data source over question files of any supported format, streaming each file in blocks."""

    def __init__(self, files: InputFiles, settings: InputSettings):
        super().__init__(files.paths, filesystem=files.filesystem)
        self._root = files.root
        self._settings = settings

    def _open_input_source(self, filesystem, path: str, **open_args):
        if format_of(path, self._settings.format) == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access (footer first)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        yield from read_rows(f, path, self._root, self._settings)

    def get_name(self) -> str:
        return "Questions"


def open_input(files: InputFiles, path: str, fmt: str):
    """A readable stream of one input file on the driver, decompressed as Ray Data's reader does."""
    if fmt == "parquet":
        return files.filesystem.open_input_file(path)
    return files.filesystem.open_input_stream(path, compression="detect")


def check_question_column(files: InputFiles, settings: InputSettings, sample: int = 100) -> None:
    """Fail fast on a misnamed question column: the first file's first rows must have it."""
    path = files.paths[0]
    fmt = format_of(path, settings.format)
    with open_input(files, path, fmt) as stream:
        records = [r for _, r in _first(parse_file(stream, fmt, settings), sample)]
    readable = [r for r in records if isinstance(r, dict)]
    if readable and not any(settings.question_column in r for r in readable):
        seen = sorted({k for r in readable for k in r})
        raise InputError(
            f"{path}: no {settings.question_column!r} column in the first rows (columns: {seen}); "
            "set input.question_column"
        )


def _first(items: Iterable, n: int) -> Iterator:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item
