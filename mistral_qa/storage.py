"""Where files live: a local path or a cloud URI, as a pyarrow filesystem and a path inside it.

Used by the batch job's input and output and by the engine's compile cache, so that a local folder,
file://, s3:// and gs:// mean the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// / gs:// URI."""
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    local = uri.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
