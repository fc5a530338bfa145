"""Retrying failed rows on resume: a row whose generation failed is taken out of the output, so the
rerun answers it again.

Only `generation_failed` rows are retried (the engine failed on the row itself: a transient fault, a
bad setting, memory); rows whose input is bad (unreadable, missing_question, non_text, empty_question,
too_long) would fail the same way again and stay. The failed rows are removed before any answering, by
rewriting each file that holds some without them (atomically, as every answer file is written):
they are then simply rows not yet answered, as after a killed run. So the output never holds an id
twice, a reader needs no de-duplication, and a crash at any point loses nothing the input does not
give back on the next run.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .io import resolve_filesystem
from .output import answer_files, write_atomically

RETRIED_KINDS = ("generation_failed",)


def is_retried(errors: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a row's error ('kind: detail') is of a retried kind; false for answered rows."""
    masks = [pc.starts_with(errors, f"{kind}:") for kind in RETRIED_KINDS]
    mask = masks[0]
    for other in masks[1:]:
        mask = pc.or_(mask, other)
    return pc.fill_null(mask, False)


def drop_failed_rows(uri: str) -> int:
    """Rewrite every answer file in `uri` without its generation_failed rows; returns how many went."""
    fs, _ = resolve_filesystem(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    dropped = 0
    for name in answer_files(uri):
        errors = pq.read_table(name, columns=["error"], filesystem=fs).column("error")
        retried = is_retried(errors)
        count = pc.sum(retried).as_py() or 0
        if not count:
            continue
        table = pq.read_table(name, filesystem=fs)
        kept = table.filter(pc.invert(retried))
        if kept.num_rows:
            write_atomically(fs, kept, name, local)
        else:
            fs.delete_file(name)
        dropped += count
    return dropped
