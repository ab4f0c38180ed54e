"""Crash-safe file writing: write under a temporary name, make it durable, rename it into place.

A reader sees the old file or the new one, never half of one. Whatever is
raised while writing (a full disk, an interrupt), the temporary file is removed
and the original error is raised (a failure to remove the temporary file never
hides it); a full disk, or a folder that cannot be written (read-only file
system, permission denied), becomes one `EnvironmentProblem` that names the
folder. Each writer gets its own temporary name, so two writers of one file
never write into each other's; one that a killed writer leaves behind is hidden
and recognisable: `.NAME[.tag].<random>.tmp` (`leftover_tmp_files`). The file
gets the permissions a plain `open()` gives (0666 less the umask), whatever the
writing library chose for its own file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager, suppress
from pathlib import Path

from dcfeat.errors import disk_full, is_disk_full, is_not_writable, not_writable

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


def leftover_tmp_files(final: Path) -> list[Path]:
    """Temporary files of `final` that writers left (killed mid-write), under any writer's name."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    prefix = f".{final.name}."
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(TMP_SUFFIX))


def _claim(final: Path, tag: str, create) -> Path:
    """A temporary name of this writer's own beside `final`, `.NAME[.tag].<random>.tmp`, made by
    `create(path)`, which raises FileExistsError where the name is taken (O_EXCL, mkdir, symlink): two
    writers of one file never get one name."""
    final = Path(final)
    for _ in range(100):
        tmp = final.with_name(f".{final.name}{'.' + tag if tag else ''}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            create(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final))


def _new_tmp(final: Path, tag: str) -> tuple[Path, int]:
    """Create this writer's own empty temporary file beside `final`: (its path, the mode it got).

    Created as open() creates a file (0666 less the umask, a default ACL applied), and never one that
    exists (O_EXCL): two writers of one file get two names.
    """
    modes = []

    def create(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        finally:
            os.close(fd)

    return _claim(final, tag, create), modes[-1]


def tmp_dir(final: Path, tag: str = "") -> Path:
    """A new empty folder of this writer's own beside `final` (`.NAME[.tag].<random>.tmp`), to fill and
    rename or move into place."""
    return _claim(final, tag, lambda tmp: tmp.mkdir())


def replace_symlink(link: Path, target: str) -> None:
    """`link` → `target`, swapped atomically (a reader sees the old link or the new one), through a
    temporary link of this writer's own: two writers swapping one link at once both succeed, the last wins."""
    link = Path(link)
    tmp = _claim(link, "", lambda tmp: tmp.symlink_to(target))
    try:
        tmp.replace(link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(final: Path, *, needed: int | None = None, tag: str = ""):
    """Yields a temporary path (an empty file) to write; on success it replaces `final` atomically.

    On any error the temporary file is removed and the error raised as it was; a full disk is
    raised as one EnvironmentProblem naming the folder (and `needed` bytes, when known), and so is a
    folder that cannot be written.
    """
    final = Path(final)
    try:
        tmp, mode = _new_tmp(final, tag)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(final.parent, needed) from None
        if is_not_writable(e):
            raise not_writable(final.parent, e) from None
        raise
    try:
        yield tmp
        # Libraries that write through their own temporary file (safetensors) leave it at 0600.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        replace_atomically(tmp, final)
    except BaseException as e:
        with suppress(OSError):  # a read-only or vanished folder: the error that matters is `e`
            tmp.unlink(missing_ok=True)
        if is_disk_full(e) or is_disk_full(e.__cause__ or e.__context__):
            raise disk_full(final.parent, needed) from None
        if is_not_writable(e) and (e.filename is None or Path(e.filename).parent == final.parent):
            raise not_writable(final.parent, e) from None
        raise


def write_text(final: Path, text: str) -> Path:
    with atomic_write(final) as tmp:
        tmp.write_text(text)
    return Path(final)


def write_bytes(final: Path, data: bytes) -> Path:
    with atomic_write(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)
