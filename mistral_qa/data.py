"""Training data: read a source, check rows (Alpaca, messages or conversations: formats.py), split,
tokenise with loss masks through the prompt template (templates.py), collate.

Bad rows are counted by reason and dropped; they never stop a job.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .formats import check_alpaca, conversation, detect_format
from .templates import AlpacaTemplate, PromptTemplate

IGNORE_INDEX = -100
ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"builtin:mobile_health": ASSETS / "mobile_health.jsonl"}
QUESTIONS = ASSETS / "questions.jsonl"  # the project's demo question set: {"id", "question"} per line
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


class DataSourceError(RuntimeError):
    """The data source cannot be read (missing file, unreachable hub, unknown format)."""


@dataclass
class DataReport:
    """How many rows came in, how many were used, and why the others were dropped."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    format: str = ""  # the row format detected (formats.FORMATS); "" before rows are checked

    def add(self, other: DataReport) -> None:
        self.total += other.total
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.format = self.format or other.format

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        rows = f"{self.format} rows" if self.format else "rows"
        return f"{self.kept}/{self.total} {rows} kept; dropped {sum(self.dropped.values())} ({reasons})"


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that could not be read; clean_rows counts it under `reason`."""

    reason: str  # "not_utf8" or "unreadable" (not JSON)


def _read_jsonl(path: Path) -> list:
    """One row per non-blank line; a line that is not UTF-8 or not JSON becomes a BadLine (counted later)."""
    rows: list = []
    with path.open("rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                rows.append(BadLine("not_utf8"))
                continue
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(BadLine("unreadable"))
    return rows


def _read_json_array(path: Path) -> list:
    """A .json file is one JSON document: it is read whole, so a bad byte fails it (saying where)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{path}: byte {err.start} ({data[err.start : err.start + 1]!r}) is not UTF-8; a .json file is read "
            "whole, so fix it or convert the file to .jsonl (one row a line: bad lines are dropped and counted)"
        ) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise DataSourceError(f"{path} must hold a JSON list of rows")
    return rows


def _read_local(path: Path) -> list:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return _read_json_array(path) if path.suffix == ".json" else _read_jsonl(path)


def _read_hub(dataset_id: str) -> list:
    """Download a hub dataset's data files (parquet/json) and read them; fail clearly offline."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(dataset_id, repo_type="dataset", allow_patterns=["*.parquet", "*.json", "*.jsonl"])
    except Exception as err:  # network, auth, missing repo: all mean "cannot get it"
        raise DataSourceError(
            f"cannot fetch dataset {dataset_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without network access, set data.source to a local .json/.jsonl/.parquet file."
        ) from None
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DataSourceError(f"dataset {dataset_id!r} has no parquet/json data files")
    return [row for f in files for row in _read_local(f)]


def read_rows(source: str) -> list:
    """Rows from a builtin name, a local file, or a hub dataset id (in that order of lookup)."""
    if source in BUILTIN:
        return _read_local(BUILTIN[source])
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataSourceError(f"data file {path} does not exist")
        return _read_local(path)
    if path.exists():
        raise DataSourceError(f"{path} is not a .json, .jsonl or .parquet file")
    return _read_hub(source)


def check_row(row: object, fmt: str = "alpaca") -> str | None:
    """The reason a row of format `fmt` (formats.FORMATS) is unusable, or None when it is good."""
    if isinstance(row, BadLine):
        return row.reason
    if not isinstance(row, dict):
        return "unreadable"
    if fmt == "alpaca":
        return check_alpaca(row)
    turns = conversation(row, fmt)
    return turns if isinstance(turns, str) else None


def clean_row(row: dict, fmt: str) -> dict:
    """A good row in its clean shape: an Alpaca dict, or {"messages": [...]} for both chat formats."""
    if fmt == "alpaca":
        return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    return {"messages": conversation(row, fmt)}


def clean_rows(rows: list) -> tuple[list[dict], DataReport]:
    """The usable rows of one source (its format detected from the rows), and what was dropped why."""
    fmt = detect_format(rows)
    report = DataReport(total=len(rows), format=fmt)
    good = []
    for row in rows:
        reason = check_row(row, fmt)
        if reason:
            report.dropped[reason] += 1
        else:
            good.append(clean_row(row, fmt))
    report.kept = len(good)
    return good, report


def split_rows(rows: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split: the same rows and seed always give the same split."""
    if len(rows) < 2:
        raise DataSourceError(f"need at least 2 usable rows to split into train and eval, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_size, len(rows) // 2)
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def row_conversation(row: dict, template: PromptTemplate) -> list[dict]:
    """A clean row as the conversation the template trains on (an Alpaca row: one exchange)."""
    if "messages" in row:
        return row["messages"]
    ask = template.instruction_messages(row["instruction"], row["input"])
    return [*ask, {"role": "assistant", "content": row["output"]}]


def tokenize_row(
    tokenizer, row: dict, max_length: int, loss_on: str, template: PromptTemplate | None = None
) -> dict | None:
    """input_ids and labels for one row (only assistant answers learnt when loss_on='response');
    None if too long. The template defaults to alpaca, the seed's."""
    template = template or AlpacaTemplate(tokenizer)
    ids, learnt = template.training_example(row_conversation(row, template))
    if len(ids) > max_length:
        return None
    labels = list(ids) if loss_on == "all" else [i if keep else IGNORE_INDEX for i, keep in zip(ids, learnt)]
    return {"input_ids": ids, "labels": labels}


def tokenize_rows(
    tokenizer, rows: list[dict], max_length: int, loss_on: str, template: PromptTemplate | None = None
) -> tuple[list[dict], DataReport]:
    report = DataReport(total=len(rows))
    out = []
    for row in rows:
        item = tokenize_row(tokenizer, row, max_length, loss_on, template)
        if item is None:
            report.dropped["over_max_length"] += 1
        else:
            out.append(item)
    report.kept = len(out)
    return out, report


def collate(items: list[dict], pad_id: int):
    """Pad to the longest row of the batch (right padding); pads get label IGNORE_INDEX and mask 0."""
    import torch

    width = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
