"""Crash-safe file writing: write under a temporary name, make it durable, rename it into place.

A reader sees the old file or the new one, never half of one. Whatever is
raised while writing (a full disk, an interrupt), the temporary file is removed
and a full disk becomes one `EnvironmentProblem` that names the folder; one that
a killed writer leaves behind is hidden and recognisable (`tmp_path`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from dcfeat.errors import disk_full, is_disk_full

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(tmp: Path, final: Path) -> None:
    """Make a finished temporary file durable, then give it its final name."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def tmp_path(final: Path, tag: str = "") -> Path:
    """`.NAME[.tag].tmp` beside `final`: hidden, and recognisable as ours when a crash leaves it."""
    final = Path(final)
    return final.with_name(f".{final.name}{'.' + tag if tag else ''}{TMP_SUFFIX}")


@contextmanager
def atomic_write(final: Path, *, needed: int | None = None, tag: str = ""):
    """Yields a temporary path to write; on success it replaces `final` atomically.

    On any error the temporary file is removed; a full disk is raised as one
    EnvironmentProblem naming the folder (and `needed` bytes, when known).
    """
    final = Path(final)
    tmp = tmp_path(final, tag)
    try:
        yield tmp
        replace_atomically(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) or is_disk_full(e.__cause__ or e.__context__):
            raise disk_full(final.parent, needed) from None
        raise


def write_text(final: Path, text: str) -> Path:
    with atomic_write(final) as tmp:
        tmp.write_text(text)
    return Path(final)


def write_bytes(final: Path, data: bytes) -> Path:
    with atomic_write(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)
