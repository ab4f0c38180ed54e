"""Every failure a user can cause or fix is a `DcfeatError` of one kind (DESIGN.md, "Errors").

The CLI prints such an error as one message, no traceback, and exits with the
kind's code; any other exception is a bug and keeps its traceback (exit 1).
A message names the file concerned and the fix.

| kind                   | exit | raised when                                                    |
|------------------------|------|----------------------------------------------------------------|
| BadInput               | 2    | an option, label, manifest, image folder or output path is wrong (click's own usage errors exit 2 too) |
| DamagedStore           | 3    | a feature store or its shards/labels are missing, truncated or inconsistent |
| DamagedRun             | 4    | a run folder is incomplete, edited or damaged                  |
| IncompatibleFeatures   | 5    | features, a run and a backbone that do not belong together     |
| EnvironmentProblem     | 6    | missing weights, no CUDA, a full disk, a store locked by another writer |
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class DcfeatError(Exception):
    """A failure the user can fix; str(self) says what is wrong, where, and how to fix it."""

    exit_code = 1


class BadInput(DcfeatError):
    exit_code = 2


class DamagedStore(DcfeatError):
    exit_code = 3


class DamagedRun(DcfeatError):
    exit_code = 4


class IncompatibleFeatures(DcfeatError):
    exit_code = 5


class EnvironmentProblem(DcfeatError):
    exit_code = 6


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full(folder: Path, needed: int | None = None) -> EnvironmentProblem:
    """The error for a full disk (or quota) while writing under `folder`."""
    folder = Path(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"; about {human_bytes(needed)} needed" if needed else ""
    have = f", {human_bytes(free)} free" if free is not None else ""
    return EnvironmentProblem(f"{folder}: no space left on the device{have}{need}. Free some space there, or "
                              "write to another folder; nothing written so far is lost, and the same command "
                              "resumes")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _NO_SPACE


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse before writing `needed` bytes under `folder` when the device cannot hold them."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise disk_full(folder, needed)
