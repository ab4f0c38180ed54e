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
| EnvironmentProblem     | 6    | missing weights, no CUDA, a full disk or read-only folder, a store locked by another writer |

A command interrupted with Ctrl-C exits 130 (128 + SIGINT, as shells report it), printing "interrupted".
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path


def first_line(error: BaseException) -> str:
    """An exception's first line for a one-line message (its type's name when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DcfeatError(Exception):
    """A failure the user can fix; str(self) says what is wrong, where, and how to fix it."""

    exit_code = 1


class BadInput(DcfeatError):
    exit_code = 2


class DamagedStore(DcfeatError):
    exit_code = 3


class DamagedRun(DcfeatError):
    exit_code = 4


class OlderLayout(ValueError):
    """A record read from a run file (config.json, calibration.json) in a layout an older dcfeat wrote and this
    one no longer reads; the file's reader words it as a DamagedRun naming the command that writes it anew."""


def check_keys(d, allowed, where: str) -> dict:
    """A JSON object `d` whose keys are all among `allowed` (a record's fields); ValueError naming `where`
    (the record's key in its file) and the keys it does not know."""
    if not isinstance(d, dict):
        raise ValueError(f"`{where}` must be an object, not {d!r}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"`{where}` holds {', '.join(f'`{k}`' for k in unknown)}, which dcfeat does not write "
                         f"(expected some of {', '.join(allowed)})")
    return d


def check_format(path: Path, found, current: int, fix: str) -> None:
    """Refuse a run file whose `format` this dcfeat does not read: a newer one (upgrade), or not a format
    number at all (`fix`: how to write the file anew). A file without `format` (None) is of format 1."""
    if found is None or (isinstance(found, int) and not isinstance(found, bool) and 1 <= found <= current):
        return
    if isinstance(found, int) and not isinstance(found, bool) and found > current:
        raise DamagedRun(f"{path}: written by a newer dcfeat (format {found}; this one reads format {current} and "
                         "older). Upgrade dcfeat (`pip install -U dcfeat`) to read it")
    raise DamagedRun(f"{path}: `format` is {found!r}, not a format number dcfeat writes (1 to {current}). {fix}")


class IncompatibleFeatures(DcfeatError):
    exit_code = 5


class EnvironmentProblem(DcfeatError):
    exit_code = 6


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Writing refused by the filesystem or its permissions, not by a lack of space.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


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


def is_not_writable(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _NOT_WRITABLE


def not_writable(folder: Path, error: OSError | None = None) -> EnvironmentProblem:
    """The error for a folder that cannot be written (read-only filesystem, no permission)."""
    why = f" ({error.strerror})" if error is not None and error.strerror else ""
    return EnvironmentProblem(f"{folder}: cannot write there{why}: the filesystem is read-only or the folder is not "
                              "yours. Make it writable, or write to another folder (--out, or a copy of the run)")


def write_problem(folder: Path, error: BaseException) -> EnvironmentProblem | None:
    """The EnvironmentProblem naming `folder` for an OSError that the disk or filesystem caused; None for others."""
    if is_disk_full(error):
        return disk_full(folder)
    if is_not_writable(error):
        return not_writable(folder, error)
    return None


@contextmanager
def writing(folder: Path):
    """Inside: a full disk or a read-only filesystem while writing under `folder` becomes one
    EnvironmentProblem naming that folder (an OSError of a write often carries no file name). A
    refused permission counts only for a file under `folder`: elsewhere it may be a read."""
    folder = Path(folder)
    try:
        yield
    except OSError as e:
        inside = e.filename is None or Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(folder))
        problem = write_problem(folder, e) if is_disk_full(e) or e.errno == errno.EROFS or inside else None
        if problem is None:
            raise
        raise problem from None


def check_writable(folder: Path) -> None:
    """Refuse before any work when `folder` (or the nearest folder above it that exists, where it
    would be created) cannot be written. Tried with a file, not asked: os.access says yes to root
    on a read-only mount."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return  # a file in the way: the writer's own check words it
    probe = existing / f".dcfeat-write-probe-{secrets.token_hex(4)}.tmp"  # one per caller, threads too
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        problem = write_problem(folder, e)
        if problem is None:
            raise
        raise problem from None
