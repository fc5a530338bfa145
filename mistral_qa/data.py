"""Alpaca-format data: read a source, check rows, split, tokenise with loss masks, collate.

Bad rows are counted by reason and dropped; they never stop a job.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .prompt import build_prompt

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

    def add(self, other: DataReport) -> None:
        self.total += other.total
        self.kept += other.kept
        self.dropped.update(other.dropped)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.kept}/{self.total} rows kept; dropped {sum(self.dropped.values())} ({reasons})"


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


def check_row(row: object) -> str | None:
    """The reason a row is unusable, or None when it is a good Alpaca row."""
    if isinstance(row, BadLine):
        return row.reason
    if not isinstance(row, dict):
        return "unreadable"
    for key in ("instruction", "output"):
        if key not in row or row[key] is None:
            return f"missing_{key}"
        if not isinstance(row[key], str):
            return f"non_text_{key}"
    if not isinstance(row.get("input") or "", str):
        return "non_text_input"
    if not row["instruction"].strip():
        return "empty_instruction"
    if not row["output"].strip():
        return "empty_output"
    return None


def clean_rows(rows: list) -> tuple[list[dict], DataReport]:
    report = DataReport(total=len(rows))
    good = []
    for row in rows:
        reason = check_row(row)
        if reason:
            report.dropped[reason] += 1
        else:
            good.append({"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]})
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


def tokenize_row(tokenizer, row: dict, max_length: int, loss_on: str) -> dict | None:
    """input_ids and labels for one row (prompt masked when loss_on='response'); None if too long."""
    prompt = build_prompt(row["instruction"], row["input"])
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(prompt + row["output"].strip(), add_special_tokens=True)["input_ids"]
    full_ids = full_ids + [tokenizer.eos_token_id]
    if len(full_ids) > max_length:
        return None
    labels = list(full_ids)
    if loss_on == "response":
        n_prompt = min(len(prompt_ids), len(full_ids) - 1)
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": full_ids, "labels": labels}


def tokenize_rows(tokenizer, rows: list[dict], max_length: int, loss_on: str) -> tuple[list[dict], DataReport]:
    report = DataReport(total=len(rows))
    out = []
    for row in rows:
        item = tokenize_row(tokenizer, row, max_length, loss_on)
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
