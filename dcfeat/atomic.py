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

The locks (flock, released by the kernel when the holder dies): `exclusive` (one holder, or readers
side by side, the others refused at once) and `waiting` (a small file's read-modify-write, writers in turn).
Checksummed writes: `record_checksum` keeps the SHA-256 of a file just written in its folder's checksums.json.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
from contextlib import contextmanager, suppress
from pathlib import Path

from dcfeat.errors import EnvironmentProblem, disk_full, is_disk_full, is_not_writable, not_writable

TMP_SUFFIX = ".tmp"
# The SHA-256 of the files dcfeat last wrote in a folder (a run's: `dcfeat info RUN --verify` compares them).
CHECKSUM_FILE = "checksums.json"
# Held (waiting) around each read-modify-write of a folder's small records: checksums.json, evaluations.json.
RECORDS_LOCK = ".records.lock"


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


def _same_file(f, path: Path) -> bool:
    """Whether the open file `f` is still the one at `path` (a holder that removes the lock file on
    release may have unlinked it between our open() and our flock())."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _locked_file(lock_path: Path, operation: int):
    """`lock_path` opened and flock()ed with `operation`, retried until the file locked is the one at
    the path: a lock taken on a file its last holder has just unlinked excludes nobody."""
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f.fileno(), operation)
        except BaseException:
            f.close()
            raise
        if _same_file(f, lock_path):
            return f
        f.close()


@contextmanager
def exclusive(lock_path: Path, busy: str, *, remove: bool = False, shared: bool = False, holder: str = ""):
    """Hold `lock_path` for the one process allowed; another is refused at once with EnvironmentProblem
    (`busy`, then who holds it) instead of waiting. flock: released by the kernel when the holder dies.

    `shared`: any number of shared holders at once (readers), none beside an exclusive one. The
    exclusive holder writes who it is (`holder`, its pid and host) into the file for the refused.
    `remove`: the file is deleted on release by its last holder (a killed holder leaves it, unlocked);
    whoever locks the file it just unlinked notices and locks the new one (`_locked_file`).
    """
    try:
        f = _locked_file(lock_path, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            who = lock_path.read_text().strip()
        except OSError:
            who = ""
        raise EnvironmentProblem(busy.format(holder=who or "another process", lock=lock_path)) from None
    with f:
        if not shared:
            f.truncate(0)
            f.write(f"{holder + ', ' if holder else ''}pid {os.getpid()} on {os.uname().nodename}")
            f.flush()
        try:
            yield
        finally:
            if not shared:
                f.truncate(0)
            if remove:
                _remove_if_last(f, lock_path, shared)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_if_last(f, lock_path: Path, shared: bool) -> None:
    """Unlink the lock file we hold, when no one else holds it (a shared holder first tries to take it
    alone; where it cannot, the others remove it)."""
    if shared:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
    lock_path.unlink(missing_ok=True)


@contextmanager
def waiting(lock_path: Path):
    """Hold `lock_path` alone, waiting for the holder before (a read-modify-write of a small file: two
    writers in turn, never one's update lost under the other's). The file is removed on release."""
    f = _locked_file(lock_path, fcntl.LOCK_EX)
    with f:
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checksums(directory: Path) -> dict[str, str]:
    """CHECKSUM_FILE: file name → SHA-256 ({} where there is none, or it is unreadable)."""
    try:
        found = json.loads((Path(directory) / CHECKSUM_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}


def record_checksum(path: Path) -> None:
    """Record the SHA-256 of a file dcfeat has just written in its folder's checksums.json (CHECKSUM_FILE),
    atomically and under the folder's records lock: two writers of one folder never lose each other's sum."""
    path = Path(path)
    with waiting(path.parent / RECORDS_LOCK):
        sums = {**read_checksums(path.parent), path.name: sha256_of(path)}
        write_text(path.parent / CHECKSUM_FILE, json.dumps(dict(sorted(sums.items())), indent=1) + "\n")
