"""Locks (flock: one holder, or readers side by side, or a small file's update waited for) and, for a
store, the clean-up that only its one writer may do.

A writer killed mid-way leaves temporary files, label parts beside the one a
split committed, and (killed between a split's commit and its clean-up) the
shards of the plans that commit replaced; the next writer removes them under
the lock, when nobody else can be halfway through writing them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import h5py

from dcfeat.atomic import TMP_SUFFIX, leftover_tmp_files
from dcfeat.errors import EnvironmentProblem
from dcfeat.layout import (
    SUPERSEDED_FILE,
    check_store_path,
    label_part,
    labels_dir,
    shards_dir,
)
from dcfeat.store import split_attrs


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


@contextmanager
def writer_lock(store: Path):
    """One writer per store; a second one is refused at once instead of waiting.

    The holder also removes what killed writers left behind (`clean_stale_files`), which is
    safe exactly because nobody else writes.
    """
    check_store_path(store)
    with exclusive(shards_dir(store) / ".lock", f"{store} is being written by {{holder}} ({{lock}}); wait for it "
                   "to finish or write to another --out"):
        clean_stale_files(store)
        yield


def existing_split_attrs(store: Path) -> dict[str, dict]:
    if not Path(store).is_file():
        return {}
    with h5py.File(store, "r") as f:
        return {name: split_attrs(g) for name, g in f.items() if isinstance(g, h5py.Group)}


def clean_stale_files(store: Path) -> list[Path]:
    """Remove what killed writers left: temporary files, the label parts of each split of the store
    other than the one it committed, and the plans (shards) its commit made stale (a split not in
    the store yet, and a plan begun after the split's commit, are left alone: the same command resumes them)."""
    store = Path(store)
    stale = leftover_tmp_files(store)
    for folder in (labels_dir(store), shards_dir(store)):
        if folder.is_dir():
            stale += folder.glob(f"*/**/.*{TMP_SUFFIX}")  # a pattern below `folder`: its own path is never one
    committed = {name: a.get("plan_id") for name, a in existing_split_attrs(store).items()}
    for name, plan_id in committed.items():
        part = labels_dir(store) / f"split={name}"
        if plan_id and (part / label_part(plan_id)).is_file():
            stale += [p for p in part.glob("*.parquet") if p.name != label_part(plan_id)]
    for path in stale:
        path.unlink(missing_ok=True)
    for name, plan_id in committed.items():
        if plan_id:
            stale += remove_superseded(store, name, plan_id)
    return stale


def superseded_plans(store: Path, split: str, plan_id: str) -> list[Path]:
    """The plan folders that the commit of `plan_id` made stale and that are still there: listed in its
    SUPERSEDED_FILE before the store's rename, removed after it (a crash between the two leaves them)."""
    record = shards_dir(store) / split / plan_id / SUPERSEDED_FILE
    try:
        names = json.loads(record.read_text()) if record.is_file() else []
    except ValueError:
        names = []
    folders = [shards_dir(store) / split / name for name in (names if isinstance(names, list) else [])
               if isinstance(name, str) and "/" not in name and name not in ("", ".", "..", plan_id)]
    return [f for f in folders if f.is_dir()]


def remove_superseded(store: Path, split: str, plan_id: str) -> list[Path]:
    """Remove the plans that the commit of `plan_id` made stale, then their list; call only once
    `plan_id` is the split's committed plan."""
    removed = superseded_plans(store, split, plan_id)
    for folder in removed:
        remove_plan(store, folder)
    (shards_dir(store) / split / plan_id / SUPERSEDED_FILE).unlink(missing_ok=True)
    return removed


def remove_plan(store: Path, directory: Path) -> None:
    """rmtree, but only of a plan folder inside this store's own shards folder."""
    root = shards_dir(store).resolve()
    target = directory.resolve()
    if target.parent.parent != root or not target.is_dir():
        raise RuntimeError(f"refusing to remove {directory}: not a plan folder of {store}")
    shutil.rmtree(target)
