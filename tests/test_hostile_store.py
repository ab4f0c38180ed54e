"""Hostile and careless use of `extract`, `info` and the store: clear errors, nothing lost, self-repair.

Each test names the defect of the adversarial pass it covers (issue "Trustworthy under bad input
and crashes"); all of them failed on 0.1.0.
"""

import errno
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from dcfeat.errors import (
    BadInput,
    DamagedStore,
    EnvironmentProblem,
    IncompatibleFeatures,
)
from dcfeat.shards import remove_plan, writer_lock
from dcfeat.shards import open_plan
from dcfeat.store import label_files, list_splits, read_split
from dcfeat.verify import verify_store
from tests.conftest import extract_args, invoke, kill_9_when, refused, sfxl_name, write_images

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def verified(store: Path) -> bool:
    return not [p for p in verify_store(store)[1] if p.serious]


@pytest.fixture
def store(images, tmp_path, tiny_model) -> Path:
    out = tmp_path / "f.h5"
    assert invoke(*extract_args(images, out, tiny_model)).exit_code == 0
    return out


# 1 ------------------------------------------------------------------ split names


@pytest.mark.parametrize("split", ["..", ".", "../../x", "a/b", "/abs", ".hidden", "", "a\\b"])
def test_bad_split_names_are_refused_before_anything_is_touched(store, tmp_path, tiny_model, images, split):
    beside = tmp_path / "precious"
    beside.mkdir()
    (beside / "data.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    refused(invoke(*extract_args(images, store, tiny_model, "--split", split)), "bad input", "--split")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert verified(store)
    with pytest.raises(BadInput):
        open_plan(store, split, read_split(store, "train").labels.drop("row"), {})


def test_plan_removal_never_leaves_the_store_own_shards_folder(store, tmp_path):
    with pytest.raises(RuntimeError):
        remove_plan(store, tmp_path)
    with pytest.raises(RuntimeError):
        remove_plan(store, store.with_suffix(".shards"))
    assert store.with_suffix(".shards").is_dir() and store.with_suffix(".labels").is_dir()


# 2, 18 -------------------------------------------------------------- store names


def test_two_stores_never_share_sidecar_folders(store, images, tiny_model):
    before = read_split(store, "train").embeddings
    refused(invoke(*extract_args(images, store.with_suffix(".hdf5"), tiny_model)), "bad input", "f.h5",
            "Choose another name")
    assert not store.with_suffix(".hdf5").exists() and verified(store)
    assert np.array_equal(read_split(store, "train").embeddings, before)


@pytest.mark.parametrize("name", ["x.labels", "x.shards", "x", "x.parquet"])
def test_a_store_name_that_is_not_h5_is_refused(tmp_path, images, tiny_model, name):
    refused(invoke(*extract_args(images, tmp_path / name, tiny_model)), "bad input", ".h5")
    assert list(tmp_path.iterdir()) == [images]


def test_a_folder_as_store_is_refused(tmp_path, images, tiny_model):
    (tmp_path / "d.h5").mkdir()
    refused(invoke(*extract_args(images, tmp_path / "d.h5", tiny_model)), "bad input", "is a folder")


# 3 ------------------------------------------------------------------ --overwrite is a transaction


class SimulatedCrash(BaseException):
    pass


def test_a_crash_between_labels_and_store_of_an_overwrite_rolls_back(store, tmp_path, tiny_model, monkeypatch):
    import dcfeat.atomic as atomic

    old = read_split(store, "train")
    fewer = tmp_path / "fewer"
    write_images(fewer, 6, seed=5)
    real = atomic.replace_atomically

    def crash_on_store(tmp, final):
        if Path(final) == store:  # the new labels are in place; the store is not
            raise SimulatedCrash
        real(tmp, final)

    monkeypatch.setattr(atomic, "replace_atomically", crash_on_store)
    with pytest.raises(SimulatedCrash):
        invoke(*extract_args(fewer, store, tiny_model, "--overwrite"), catch_exceptions=False)
    monkeypatch.setattr(atomic, "replace_atomically", real)
    after = read_split(store, "train")  # the old split with its own labels, as if nothing happened
    assert after.labels.equals(old.labels) and np.array_equal(after.embeddings, old.embeddings)
    assert verified(store)
    r = invoke(*extract_args(fewer, store, tiny_model, "--overwrite"))
    assert r.exit_code == 0 and "6 rows written" in r.output, r.output
    assert read_split(store, "train").labels.height == 6 and verified(store)
    assert len(label_files(store, "train")) == 1 and len(list(store.with_suffix(".shards").glob("train/*"))) == 1


@pytest.mark.slow
def test_kill_9_during_overwrite_then_the_same_command_leaves_a_verified_store(store, tmp_path, tiny_model, forks):
    other = tmp_path / "other"
    write_images(other, 48, seed=7, size=160)
    reference = tmp_path / "ref.h5"
    assert invoke(*extract_args(other, reference, tiny_model)).exit_code == 0
    args = extract_args(other, store, tiny_model, "--overwrite")
    shards = store.with_suffix(".shards")
    for wanted in (3, 5):  # kill once the new plan has that many shards
        kill_9_when(forks, args, lambda: len(list(shards.glob("train/*/0*.h5"))) >= wanted)
        assert verified(store)  # whatever the kill hit, the store verifies (old split or new)
    assert invoke(*args).exit_code == 0
    got, ref = read_split(store, "train"), read_split(reference, "train")
    assert got.labels.equals(ref.labels) and np.array_equal(got.embeddings, ref.embeddings)
    assert verified(store) and not list(tmp_path.glob("**/.*.tmp"))


# 5, 9 --------------------------------------------------------------- numeric options


@pytest.mark.parametrize("option", [("--shard-rows", -5), ("--shard-rows", 0), ("--batch-size", 0),
                                    ("--workers", -1), ("--image-size", 0), ("--image-size", -14),
                                    ("--image-size", 50), ("--cache-tokens", -1)])
def test_extract_options_out_of_range_create_nothing(tmp_path, images, tiny_model, option):
    out = tmp_path / "s" / "f.h5"
    refused(invoke(*extract_args(images, out, tiny_model), *option), "bad input", option[0])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("option", [("--M", 0), ("--M", -5), ("--M", "nan"), ("--N", 0), ("--epochs", 0),
                                    ("--dim", 0), ("--s", 0), ("--m", 10), ("--m", -0.1), ("--batch-size", 0),
                                    ("--lr-heads", "inf"), ("--min-images-per-class", 0),
                                    ("--finetune-blocks", -1), ("--split", "../x")])
def test_train_options_out_of_range_create_no_run_folder(city_store, tmp_path, option):
    out = tmp_path / "run"
    refused(invoke("train", "--feats", city_store, "--out", out, "--no-progress", *option), "bad input", option[0])
    assert not out.exists() and not (city_store.parent / "runs").exists()


@pytest.mark.parametrize("option", [("--k", "0"), ("--k", "-1,5"), ("--k", "a"), ("--cells", 0),
                                    ("--threshold", -1), ("--threshold", "nan")])
def test_evaluate_options_out_of_range(city_store, city_run, tmp_path, option):
    out = tmp_path / "eval"
    refused(invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", out, *option), "bad input",
            option[0])
    assert not out.exists()


# 7 ------------------------------------------------------------------ non-ASCII ids


def test_non_ascii_file_names_survive_extract_train_evaluate(tmp_path, tiny_model):
    folder = tmp_path / "ímages"
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(12):
        sub = folder / ("straße" if i % 2 else "日本")
        sub.mkdir(parents=True, exist_ok=True)
        name = sfxl_name(550000 + 5 * (i % 3), 4180000).replace("@.jpg", f"café{i}@.jpg")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(sub / name)
    out = tmp_path / "f.h5"
    assert invoke(*extract_args(folder, out, tiny_model)).exit_code == 0
    ids = read_split(out, "train").labels["image_id"].to_list()
    assert any("café" in i and "straße" in i for i in ids) and any("日本" in i for i in ids)
    with h5py.File(out) as f:
        assert f["train"]["ids"].asstr()[()].tolist() == ids  # UTF-8 for any HDF5 reader
    r = invoke("train", "--feats", out, "--min-images-per-class", "1", "--epochs", "1", "--no-progress",
               "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert invoke("evaluate", "--feats", out, "--run", tmp_path / "run", "--split", "train").exit_code == 0


# 10 ----------------------------------------------------------------- verify and repair


def _shard(store: Path, index: int) -> Path:
    return sorted(store.with_suffix(".shards").glob(f"train/*/{index:06d}.h5"))[0]


def test_verify_passes_a_sound_store(store):
    r = invoke("info", store, "--verify")
    assert r.exit_code == 0 and "verified" in r.output, r.output


def test_a_truncated_shard_is_found_refused_and_repaired(store, images, tiny_model, tmp_path):
    before = read_split(store, "train")
    shard = _shard(store, 1)
    shard.write_bytes(shard.read_bytes()[:3000])
    refused(invoke("info", store, "--verify"), "damaged store", shard.name, "re-run")
    refused(invoke("train", "--feats", store, "--out", tmp_path / "run", "--no-progress"), "damaged store",
            shard.name, "extract")
    assert not (tmp_path / "run").exists()
    r = invoke(*extract_args(images, store, tiny_model))
    assert r.exit_code == 0 and "already complete" not in r.output, r.output
    assert verified(store) and np.array_equal(read_split(store, "train").embeddings, before.embeddings)


@pytest.mark.parametrize("damage", ["shard", "labels", "plan"])
def test_the_same_extract_repairs_deleted_parts(store, images, tiny_model, damage):
    before = read_split(store, "train")
    if damage == "shard":
        _shard(store, 0).unlink()
    elif damage == "labels":
        shutil.rmtree(store.with_suffix(".labels"))
    else:
        shutil.rmtree(_shard(store, 0).parent)
    assert not verified(store)
    assert invoke(*extract_args(images, store, tiny_model)).exit_code == 0
    assert verified(store)
    after = read_split(store, "train")
    assert after.labels.equals(before.labels) and np.array_equal(after.embeddings, before.embeddings)


def test_a_changed_shard_fails_its_checksum(store):
    with h5py.File(_shard(store, 0), "r+") as f:
        f["embeddings"][0, 0] += 1
    r = invoke("info", store, "--verify")
    refused(r, "damaged store", "checksum", "delete")


# 12 ----------------------------------------------------------------- full disk


def test_a_full_disk_stops_with_one_message_and_no_tmp_files(images, tmp_path, tiny_model, monkeypatch):
    import dcfeat.atomic as atomic

    out = tmp_path / "f.h5"
    real = atomic.replace_atomically
    calls = []

    def full_after_two(tmp, final):
        calls.append(final)
        if len(calls) > 4:  # plan files and two shards fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        real(tmp, final)

    monkeypatch.setattr(atomic, "replace_atomically", full_after_two)
    refused(invoke(*extract_args(images, out, tiny_model)), "environment", "no space left", str(tmp_path))
    assert not list(tmp_path.glob("**/.*.tmp"))
    monkeypatch.setattr(atomic, "replace_atomically", real)
    assert invoke(*extract_args(images, out, tiny_model)).exit_code == 0 and verified(out)


def test_not_enough_free_space_is_refused_before_writing(images, tmp_path, tiny_model, monkeypatch):
    import shutil as sh

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr("dcfeat.errors.shutil.disk_usage", lambda p: usage._replace(free=1000))
    refused(invoke(*extract_args(images, tmp_path / "f.h5", tiny_model)), "environment", "needed", "free")
    assert not list(tmp_path.glob("f.shards/train/*/0*.h5"))


def test_a_disk_that_fills_up_midway_stops_with_one_message_and_no_tmp_files(images, tmp_path, tiny_model,
                                                                             fake_mount):
    """A filesystem of 24 kB (a store of 24 rows takes ~52 kB): a shard's write raises ENOSPC once the plan and
    a first shard fit; once there is room the same command finishes."""
    small = tmp_path / "small"
    small.mkdir()
    fake_mount(small, size=24_000)
    args = extract_args(images, small / "f.h5", tiny_model, "--dtype", "float32")
    refused(invoke(*args), "environment", "no space left", str(small))
    assert not list(small.glob("**/.*.tmp"))
    assert 0 < len(list(small.glob("f.shards/train/*/0*.h5"))) < 3  # it filled up midway, not at the start
    fake_mount(small, size=4 << 20)
    assert invoke(*args).exit_code == 0 and verified(small / "f.h5")


# 19 ----------------------------------------------------------------- leftovers of crashes


def test_tmp_files_of_killed_writers_are_removed_by_the_next_writer(store, images, tiny_model):
    leftovers = [store.with_name(f".{store.name}.4242.tmp"), _shard(store, 0).with_name(".000009.h5.tmp"),
                 store.with_suffix(".labels") / "split=train" / ".part-x.parquet.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    assert any(not p.serious for p in verify_store(store)[1]) and verified(store)
    assert "already complete" in invoke(*extract_args(images, store, tiny_model)).output
    assert not any(p.exists() for p in leftovers)


# 20 ----------------------------------------------------------------- exit codes


def test_each_error_kind_has_its_documented_exit_code(store, images, tiny_model, tmp_path):
    assert (BadInput.exit_code, DamagedStore.exit_code, IncompatibleFeatures.exit_code,
            EnvironmentProblem.exit_code) == (2, 3, 5, 6)
    refused(invoke("train", "--feats", tmp_path / "none.h5"), "bad input", "no such feature store")
    refused(invoke(*extract_args(images, store, tiny_model, "--pooling", "mean", "--split", "t")), "incompatible",
            "pooling")
    with writer_lock(store):
        refused(invoke(*extract_args(images, store, tiny_model)), "environment", "is being written")
    assert [s.name for s in list_splits(store)] == ["train"]


# 8 ------------------------------------------------------------------ labels written by another program


def test_impossible_labels_in_a_foreign_store_are_a_damaged_store(store, tmp_path):
    import polars as pl

    [part] = label_files(store, "train", list_splits(store)[0].attrs["plan_id"])
    labels = pl.read_parquet(part)
    labels.with_columns(utm_letter=pl.lit("Z")).write_parquet(part)
    refused(invoke("train", "--feats", store, "--out", tmp_path / "run", "--no-progress"), "damaged store", "Z",
            "labels")


# Second adversarial pass ----------------------------------------------------------------------------------------
# D22: stores written by other programs with datasets of the wrong shape


def _foreign_store(tmp_path: Path, embeddings: np.ndarray, dim: int | None = None) -> Path:
    """A store as another program writes it with h5py, following docs/data.md's "The feature store"."""
    import polars as pl

    store = tmp_path / "foreign.h5"
    n = embeddings.shape[0]
    ids = [f"img{i}.jpg" for i in range(n)]
    with h5py.File(store, "w") as f:
        f.attrs["dcfeat_format"] = 1
        g = f.create_group("train")
        g.create_dataset("embeddings", data=embeddings)
        g.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
        g.attrs.update(model="other", pooling="cls", image_size=224, images_root="/x", complete=True,
                       dim=embeddings.shape[-1] if dim is None else dim)
    part = store.with_suffix(".labels") / "split=train"
    part.mkdir(parents=True)
    pl.DataFrame({"row": np.arange(n), "image_id": ids, "utm_east": 550000.0 + np.arange(n),
                  "utm_north": np.full(n, 4180000.0), "utm_zone": np.full(n, 10, np.int8), "utm_letter": ["S"] * n,
                  "lat": [None] * n, "lon": [None] * n, "heading": [None] * n}).write_parquet(part / "part-0.parquet")
    return store


@pytest.mark.parametrize("shape, dim, shown", [((12,), None, "shape (12,)"), ((12, 4, 8), None, "shape (12, 4, 8)"),
                                               ((12, 8), 16, "dim = 16")])
def test_a_foreign_store_of_the_wrong_shape_is_a_damaged_store(tmp_path, shape, dim, shown):
    store = _foreign_store(tmp_path, np.ones(shape, np.float32), dim)
    for args in (("info", store), ("info", store, "--verify"),
                 ("train", "--feats", store, "--out", tmp_path / "run", "--no-progress")):
        refused(invoke(*args), "damaged store", "'train'" if args[-1] != "--verify" else "train", shown)
    with pytest.raises(DamagedStore, match="split 'train'"):
        read_split(store, "train")
    assert not (tmp_path / "run").exists()


def test_a_sound_foreign_store_verifies(tmp_path):
    store = _foreign_store(tmp_path, np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32))
    assert verified(store) and read_split(store, "train").embeddings.shape == (12, 8)


# D24: shards of a replaced plan, left by a crash between the commit and the clean-up


def test_a_crash_after_the_commit_leaves_old_shards_that_the_next_writer_removes(store, tmp_path, tiny_model,
                                                                                  monkeypatch):
    import dcfeat.atomic as atomic

    fewer = tmp_path / "fewer"
    write_images(fewer, 6, seed=5)
    real = atomic.replace_atomically

    def crash_after_store(tmp, final):
        real(tmp, final)
        if Path(final) == store:  # committed: the old plan's shards are not removed yet
            raise SimulatedCrash

    monkeypatch.setattr(atomic, "replace_atomically", crash_after_store)
    with pytest.raises(SimulatedCrash):
        invoke(*extract_args(fewer, store, tiny_model, "--overwrite"), catch_exceptions=False)
    monkeypatch.setattr(atomic, "replace_atomically", real)
    plans = store.with_suffix(".shards") / "train"
    assert read_split(store, "train").labels.height == 6 and len(list(plans.iterdir())) == 2
    assert any("replaced" in p.what and not p.serious for p in verify_store(store)[1]) and verified(store)
    r = invoke(*extract_args(fewer, store, tiny_model, "--overwrite"))
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    [kept] = plans.iterdir()
    assert kept.name == list_splits(store)[0].attrs["plan_id"] and verified(store)
    assert len(label_files(store, "train")) == 1


def test_an_unfinished_plan_begun_after_the_commit_is_kept_for_its_resume(store, tmp_path, tiny_model, monkeypatch):
    import dcfeat.shards as shards

    more = tmp_path / "more"
    write_images(more, 30, seed=6)
    real = shards.write_shard
    written = []

    def crash_on_second_shard(*a, **k):
        if written:
            raise SimulatedCrash
        written.append(real(*a, **k))
        return written[-1]

    monkeypatch.setattr(shards, "write_shard", crash_on_second_shard)
    monkeypatch.setattr("dcfeat.extract.write_shard", crash_on_second_shard)
    with pytest.raises(SimulatedCrash):
        invoke(*extract_args(more, store, tiny_model, "--overwrite"), catch_exceptions=False)
    monkeypatch.undo()
    [pending] = [p for p in (store.with_suffix(".shards") / "train").iterdir()
                 if p.name != list_splits(store)[0].attrs["plan_id"]]
    assert invoke(*extract_args(more, store, tiny_model, "--split", "other")).exit_code == 0  # another writer
    assert (pending / written[0].name).is_file()  # its shard waits for the same command
    r = invoke(*extract_args(more, store, tiny_model, "--overwrite"))
    assert r.exit_code == 0 and read_split(store, "train").labels.height == 30 and verified(store)


# D25: one file written by two writers at once, and the permissions of what is written


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    from dcfeat.atomic import atomic_write

    final = tmp_path / "x.json"
    with atomic_write(final) as first:
        with atomic_write(final) as second:
            assert first != second and first.parent == second.parent == tmp_path
            assert first.name.startswith(".x.json.") and first.name.endswith(".tmp")
            second.write_text("second")
        first.write_text("first")
    assert final.read_text() == "first" and list(tmp_path.iterdir()) == [final]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    from dcfeat.atomic import atomic_write, write_bytes

    old = os.umask(umask)
    try:
        (tmp_path / "plain").write_bytes(b"")
        write_bytes(tmp_path / "a.bin", b"x")
        with atomic_write(tmp_path / "model.safetensors") as tmp:  # safetensors writes its own file at 0600
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {n: oct(0o666 & ~umask) for n in ("plain", "a.bin", "model.safetensors")}


def test_every_file_of_a_run_has_the_same_permissions(city_run):
    modes = {p.name: p.stat().st_mode & 0o777 for p in city_run.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes


# D11: a failure to remove the temporary file never hides what went wrong


def test_a_failed_clean_up_keeps_the_original_error(tmp_path, monkeypatch):
    from dcfeat.atomic import atomic_write

    def read_only_unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with pytest.raises(ValueError, match="the original"):
        with atomic_write(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            monkeypatch.setattr(Path, "unlink", read_only_unlink)
            raise ValueError("the original")


# D17's sibling: `%` in a store's name is a printf-style specifier to HDF5's virtual datasets


@pytest.mark.parametrize("name", ["50%b.h5", "a%%x.h5", "100%.h5"])
def test_a_percent_sign_in_the_store_name_reads_back_its_own_shards(tmp_path, name):
    import polars as pl

    from dcfeat.labels import LABEL_SCHEMA
    from dcfeat.shards import write_split

    n = 6
    labels = pl.DataFrame({"image_id": [f"i{i}.jpg" for i in range(n)], "utm_east": [550000.0 + i for i in range(n)],
                           "utm_north": [4180000.0] * n, "utm_zone": [10] * n, "utm_letter": ["S"] * n},
                          ).with_columns(pl.lit(None).alias(c) for c in ("lat", "lon", "heading")
                                         ).select([pl.col(c).cast(t) for c, t in LABEL_SCHEMA.items()])
    emb = np.arange(n * 8, dtype=np.float32).reshape(n, 8)
    write_split(tmp_path / name, "train", emb, labels, {"model": "m", "pooling": "cls", "image_size": 224,
                                                        "images_root": "/x"}, shard_rows=4)
    assert np.array_equal(read_split(tmp_path / name, "train").embeddings, emb) and verified(tmp_path / name)
