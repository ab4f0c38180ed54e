"""`dcfeat index`: a split's photos embedded by a run and filed under its cells, as a CellDatabase on disk
(dcfeat.database), that `dcfeat evaluate --database` searches; `--add` appends another split's photos.

The split is read in chunks (`model.EMBED_CHUNK` rows: never more raw features than that at once),
each chunk embedded in the database's space (the run's projection, or the raw features) and scaled to
unit length; the embeddings go straight to their cell-sorted places in the file. A photo whose cell is
no class of the run is filed under the nearest class's cell (dcfeat.partition.assign_classes): the
report counts them and says how far the farthest lies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dcfeat.database import CellDatabase, create, read_manifest, unit_rows
from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput, check_writable, writing
from dcfeat.identity import check_features
from dcfeat.model import EMBED_CHUNK
from dcfeat.partition import filed_rows
from dcfeat.progress import progress_bar
from dcfeat.resume import run_lock
from dcfeat.run import Run, database_identity, load_run
from dcfeat.sampling import check_finite, read_rows
from dcfeat.store import read_split, split_info


@dataclass
class IndexResult:
    """What `index_files`/`add_files` wrote: the database (reopened), its folder, the rows this call added
    (0: the split was in it already) and their rows outside every class."""

    database: CellDatabase
    path: Path
    added: int
    outside: int
    warnings: list[str] = field(default_factory=list)


def _fix(run_dir: Path) -> str:
    return (f"Build a database for this run with `dcfeat index --run {run_dir} --out NEW_FOLDER`, or pass the "
            "--run the database was built with (`dcfeat info DB` names it)")


def _checked_split(run: Run, store: Path, split: str):
    """The split's labels (its features stay on disk), refused where they are not the run's kind of features."""
    labels = read_split(store, split, embeddings=False)
    check_features(run.feature_identity, labels.attrs, what=f"split '{split}' of {store}")
    if labels.labels.height == 0:
        raise BadInput(f"--split {split}: split '{split}' of {store} holds no rows to index. Extract images into it "
                       f"with `dcfeat extract --split {split}`, or choose another split")
    return labels


def _rows(run: Run, store: Path, split: str, space: str, progress: bool):
    """The split's rows for the database, read and embedded chunk by chunk as the writer asks for them."""
    data = _checked_split(run, store, split)
    n = data.labels.height
    source = {"store": str(Path(store).resolve()), "split": split, "plan_id": data.attrs.get("plan_id")}

    def features():
        with progress_bar(f"indexing {split}", n, enabled=progress) as advance:
            for start in range(0, n, EMBED_CHUNK):
                x = read_rows(store, split, "embeddings", [(start, min(start + EMBED_CHUNK, n))])
                check_finite(x, split, start)
                yield x
                advance(len(x))

    return filed_rows(run.classes, run.M, data.labels, (unit_rows(run.model.embedded(x, space)) for x in features()), source)


def _open_run(run_dir: Path, device: str) -> Run:
    run = load_run(run_dir, resolve_device(device))
    if run.finetune_blocks:
        raise BadInput(f"--run {run_dir} tunes the last {run.finetune_blocks} backbone blocks, whose features "
                       "`dcfeat index` does not compute: evaluate it with `--database-split` instead")
    return run


def index_files(store: Path, run_dir: Path, split: str, out: Path, *, space: str = "projected",
                device: str = "auto", progress: bool = True) -> IndexResult:
    """`dcfeat index`: the split's photos in a new database at `out` (refused where it exists), atomically."""
    out = Path(out)
    if out.exists():
        raise BadInput(f"--out {out} exists; add a split to a database with `dcfeat index --add --out {out}`, or "
                       "choose a new --out")
    split_info(store, split)  # a store or split that is not there is said before the run is loaded
    check_writable(out.parent)
    with run_lock(run_dir, "index"):
        run = _open_run(run_dir, device)
        rows = _rows(run, store, split, space, progress)
        built_for = {**database_identity(run, space), "run": str(Path(run_dir).resolve())}
        with writing(out.parent):
            db = create(out, rows, num_classes=len(run.classes), space=space, built_for=built_for,
                        dim=run.model.projection.linear.out_features if space == "projected"
                        else run.feature_identity.dim)
    return IndexResult(db, out, db.rows, db.outside, _warnings(db, db.outside, db.rows))


def add_files(store: Path, run_dir: Path, split: str, out: Path, *, space: str | None = None,
              device: str = "auto", progress: bool = True) -> IndexResult:
    """`dcfeat index --add`: the split's photos appended to the database at `out` (a new segment, atomic and
    resumable); nothing where the same split (its plan id) is in it already."""
    out = Path(out)
    header = read_manifest(out)
    if space is not None and space != header["space"]:
        raise BadInput(f"--space {space}: the database {out} holds {header['space']} descriptors; leave --space out "
                       "to add in its space, or build another database")
    split_info(store, split)
    with run_lock(run_dir, "index"):
        run = _open_run(run_dir, device)
        db = CellDatabase.open(out)
        db.check_built_for(database_identity(run, db.space), _fix(run_dir))
        source = {"store": str(Path(store).resolve()), "split": split,
                  "plan_id": split_info(store, split).attrs.get("plan_id")}
        if db.added(source):
            return IndexResult(db, out, 0, 0, [f"split '{split}' of {store} is in {out} already (the same images: "
                                               "its plan id); nothing added"])
        before = db.rows
        rows = _rows(run, store, split, db.space, progress)
        with writing(out):
            db = db.add(rows)
    added, outside = db.rows - before, int(rows.outside.sum())
    return IndexResult(db, out, added, outside, _warnings(db, outside, added))


def _warnings(db: CellDatabase, outside: int, rows: int) -> list[str]:
    farthest = max((e.get("farthest_outside_m", 0.0) for e in db.header["segments"]), default=0.0)
    if outside and farthest > 1000:
        return [f"{outside} of {rows} photos lie in no class cell of the run and are searched under the nearest "
                f"class's cell, the farthest {farthest:,.0f} m from it: the run was trained on another area than "
                "the database covers"]
    return []
