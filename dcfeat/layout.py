"""Paths and names of the feature store, format version 1 (DESIGN.md, "Feature store").

`NAME.h5` sits beside `NAME.labels/split=<split>/part-<plan_id>.parquet` and
`NAME.shards/<split>/<plan_id>/`; a split is an HDF5 group whose attributes say
what made its features. Readers (dcfeat.store), writers (dcfeat.shards) and
`dcfeat info --verify` all take these names from here. Plain names and paths
only (no HDF5): the command line checks split names with them before loading anything.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from dcfeat.errors import BadInput, check_writable

FORMAT_VERSION = 1
STORE_SUFFIXES = (".h5", ".hdf5")
# A split name becomes an HDF5 group and a folder name: no separators, no "." or "..", no hidden names.
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_split_name(split: str) -> str:
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split) or split in (".", ".."):
        raise BadInput(f"--split {split!r}: a split name is letters, digits, '.', '_' and '-', starting with a "
                       "letter or digit (train, val, test, test-db, …); no '/' and no '..'")
    return split


def check_store_path(store: Path) -> Path:
    """The store a writer may write: NAME.h5 or NAME.hdf5, not a folder, in a folder that is one (or can be
    made) and can be written, and no other store sharing its NAME.labels/ and NAME.shards/."""
    store = Path(store)
    if store.suffix.lower() not in STORE_SUFFIXES:
        raise BadInput(f"--out {store}: a feature store is a NAME.h5 (or .hdf5) file, its labels and shards go to "
                       "NAME.labels/ and NAME.shards/ beside it. Choose a name ending in .h5")
    if store.is_dir():
        raise BadInput(f"--out {store} is a folder; name the store file inside it, e.g. {store / 'feats.h5'}")
    check_output_folder(store, "--out")
    if store.parent.is_dir():
        others = [p.name for p in store.parent.glob(f"{glob.escape(store.stem)}.*")
                  if p.suffix.lower() in STORE_SUFFIXES and p.name != store.name]
        if others:
            raise BadInput(f"{store}: {others[0]} in the same folder already uses {store.stem}.labels/ and "
                           f"{store.stem}.shards/; two stores cannot share them. Choose another name for --out")
    return store


def check_output_folder(out: Path, option: str) -> None:
    """Refuse, before anything is created, an output whose folder cannot exist (BadInput: a regular file
    stands on its path) or cannot be written (EnvironmentProblem: read-only file system, no permission)."""
    folder = Path(out).absolute().parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"{option} {out}: {existing} is a file, not a folder, so nothing can be written under it. "
                       f"Choose another {option}")
    check_writable(folder)


def labels_dir(store: Path) -> Path:
    return Path(store).with_suffix(".labels")


def shards_dir(store: Path) -> Path:
    return Path(store).with_suffix(".shards")


# In the plan folder of a split being committed: the split's other plans, which the commit makes stale.
SUPERSEDED_FILE = "superseded.json"


def label_part(plan_id: str) -> str:
    """The label file of one plan of a split. The store's rename is the commit point of a split: the
    label file it names (by its plan_id) is the split's, and any other part is stale or unfinished."""
    return f"part-{plan_id}.parquet"
