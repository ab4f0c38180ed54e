"""`dcfeat info --verify`: open every shard, check its rows and checksum, the labels, and say what to do.

The quick checks that every reader makes (dcfeat.store) catch missing and
unreadable shards; this reads everything once, so it also finds a shard whose
bytes changed, rows that do not match the store's record, and leftovers of
crashes (removed by the next writer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dcfeat.atomic import TMP_SUFFIX, leftover_tmp_files
from dcfeat.errors import DcfeatError
from dcfeat.layout import label_part, labels_dir, shards_dir
from dcfeat.shards import shard_checksum, superseded_plans
from dcfeat.store import (
    label_files,
    layout_fix,
    layout_problem,
    open_store,
    read_ids,
    read_labels,
    split_info,
)


@dataclass(frozen=True)
class Problem:
    split: str
    where: str
    what: str
    fix: str
    serious: bool = True  # False: a leftover the next `dcfeat extract` removes; the data is fine


def _extract_fix(store: Path, split: str, attrs: dict) -> str:
    root = attrs.get("images_root", "DIR")
    return (f"re-run `dcfeat extract --images {root} --split {split} --out {store}` with the options it was made "
            "with: it re-extracts only what is damaged")


def _check_shards(store: Path, split: str, group: h5py.Group, fix: str) -> list[Problem]:
    record = group.get("shards")
    problems = []
    if record is None:  # written by another program: no record, so read every row once
        ds = group["embeddings"]
        try:
            for start in range(0, ds.shape[0], 1 << 16):
                if not np.isfinite(ds[start:start + (1 << 16)]).all():
                    problems.append(Problem(split, f"rows {start}…", "non-finite values", fix))
                    break
        except OSError as e:
            problems.append(Problem(split, str(store), f"unreadable embeddings ({e})", fix))
        return problems
    files, rows, sums = read_ids(record["files"]), record["rows"][()], read_ids(record["checksums"])
    for name, n, expected in zip(files, rows, sums):
        path = Path(store).parent / name
        if not path.is_file():
            problems.append(Problem(split, str(path), "shard file missing", fix))
            continue
        try:
            with h5py.File(path, "r") as f:
                got = f["embeddings"].shape[0]
                actual = shard_checksum(f)
        except (OSError, KeyError) as e:
            problems.append(Problem(split, str(path), f"unreadable ({e})", fix))
            continue
        if got != n:
            problems.append(Problem(split, str(path), f"{got} rows where the store expects {n}", fix))
        elif actual != expected:
            problems.append(Problem(split, str(path), f"checksum {actual} differs from the recorded {expected}: "
                                    "its bytes changed after it was written", f"delete {path}, then {fix}"))
    return problems


def _check_labels(store: Path, split: str, group: h5py.Group, fix: str) -> list[Problem]:
    where = str(labels_dir(store) / f"split={split}")
    try:
        labels = read_labels(store, split, group.attrs.get("plan_id"),
                             positions=bool(group.attrs.get("labelled", True)))
    except DcfeatError as e:
        return [Problem(split, where, str(e).split(". Re-run")[0], fix)]
    rows = group["embeddings"].shape[0]
    if labels.height != rows:
        return [Problem(split, where, f"{labels.height} label rows for {rows} embeddings", fix)]
    try:
        ids = read_ids(group["ids"])
    except OSError as e:
        return [Problem(split, str(store), f"unreadable ids ({e})", fix)]
    if not np.array_equal(ids, labels["image_id"].to_numpy()):
        return [Problem(split, where, "image ids differ from the embeddings' ids", fix)]
    return []


def _leftovers(store: Path, split: str, plan_id: str | None) -> list[Problem]:
    later = "removed by the next `dcfeat extract` on this store; nothing to do"
    out = []
    if plan_id and len(label_files(store, split)) > 1:
        for path in label_files(store, split):
            if path.name != label_part(plan_id):
                out.append(Problem(split, str(path), "label file of an unfinished write", later, serious=False))
    part = shards_dir(store) / split
    if part.is_dir():
        for path in part.glob(f"*/.*{TMP_SUFFIX}"):
            out.append(Problem(split, str(path), "temporary file of a killed writer", later, serious=False))
    for path in superseded_plans(store, split, plan_id) if plan_id else []:
        out.append(Problem(split, str(path), "shards of the plan this split replaced", later, serious=False))
    return out


def verify_store(store: Path) -> tuple[list[str], list[Problem]]:
    """(split names, every problem found); reads every shard once."""
    store = Path(store)
    problems = [Problem("-", str(p), "temporary file of a killed writer",
                        "removed by the next `dcfeat extract` on this store; nothing to do", serious=False)
                for p in leftover_tmp_files(store)]
    with open_store(store) as f:
        names = [n for n, g in f.items() if isinstance(g, h5py.Group) and "embeddings" in g]
        for name in names:
            group = f[name]
            problem = layout_problem(group)
            if problem:  # datasets of the wrong shape: nothing below can be read sensibly
                problems.append(Problem(name, f"{store}:/{name}", problem, layout_fix(name)))
                continue
            attrs = split_info(store, name).attrs
            fix = _extract_fix(store, name, attrs)
            if not attrs.get("complete", True):
                problems.append(Problem(name, str(store), "incomplete: its extraction never finished", fix))
            problems += _check_shards(store, name, group, fix)
            problems += _check_labels(store, name, group, fix)
            problems += _leftovers(store, name, attrs.get("plan_id"))
    return names, problems
