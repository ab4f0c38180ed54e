"""`dcfeat extract` and `dcfeat info` end to end on tiny JPEGs and a tiny random DINOv2."""

import io
import os
import socket
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from PIL import Image

from dcfeat.shards import writer_lock
from dcfeat.store import list_splits, read_failures, read_split, split_info
from tests.conftest import extract_args, invoke, kill_9_when, sfxl_name, write_images


def test_extract_writes_a_format_v1_store(images, tmp_path, tiny_model):
    out = tmp_path / "f.h5"
    r = invoke(*extract_args(images, out, tiny_model), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "24 rows written, 0 failures" in r.output and "RANDOM BACKBONE" in r.output
    with h5py.File(out) as f:
        assert f.attrs["dcfeat_format"] == 1
        g = f["train"]
        assert g["embeddings"].shape == (24, 32) and g["embeddings"].dtype == np.float16
        ids = g["ids"].asstr()[()].tolist()
        for key in ("model", "pooling", "image_size", "dim", "images_root", "complete"):
            assert key in g.attrs
        assert g.attrs["model"] == "tiny-dinov2" and bool(g.attrs["complete"])
    assert ids == sorted(ids) and all(i.startswith("d") and "/" in i for i in ids)
    # Labels: hive-partitioned Parquet that polars and pyarrow read directly.
    labels = pl.scan_parquet(out.with_suffix(".labels") / "**/*.parquet", hive_partitioning=True).collect()
    assert labels["split"].unique().to_list() == ["train"]
    assert labels.sort("row")["image_id"].to_list() == ids
    import pyarrow.dataset as ds
    assert ds.dataset(out.with_suffix(".labels"), partitioning="hive").count_rows() == 24
    split = read_split(out, "train")
    assert np.isfinite(split.embeddings).all() and np.abs(split.embeddings).sum(1).min() > 0

    info = invoke("info", out, catch_exceptions=False)
    assert info.exit_code == 0
    for word in ("train", "24", "32", "float16", "tiny-dinov2 (random init)", "cls", "56", "yes"):
        assert word in info.output


def test_rerun_is_a_no_op_and_a_second_split_leaves_the_first_intact(images, tmp_path, tiny_model):
    out = tmp_path / "f.h5"
    assert invoke(*extract_args(images, out, tiny_model), catch_exceptions=False).exit_code == 0
    before = read_split(out, "train").embeddings
    r = invoke(*extract_args(images, out, tiny_model), catch_exceptions=False)
    assert "already complete" in r.output
    more = tmp_path / "more"
    write_images(more, 5, seed=3)
    assert invoke(*extract_args(more, out, tiny_model, "--split", "test"), catch_exceptions=False).exit_code == 0
    assert [s.name for s in list_splits(out)] == ["test", "train"]
    assert np.array_equal(read_split(out, "train").embeddings, before)
    assert read_split(out, "test").embeddings.shape == (5, 32)


def test_manifest_source(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.full((64, 80, 3), 40 * i, np.uint8)).save(folder / f"IMG_{i}.jpg")
        rows.append(f"IMG_{i}.jpg,{37.70 + i * 1e-4},{-122.49}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,lat,lon\n" + "\n".join(rows) + "\n")
    out = tmp_path / "f.h5"
    r = invoke("extract", "--manifest", manifest, "--images", folder, "--out", out, "--model", tiny_model,
               "--image-size", 56, "--workers", 0, "--no-progress", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    labels = read_split(out, "train").labels
    assert labels["utm_zone"].to_list() == [10] * 6 and labels["lat"][0] == pytest.approx(37.70)


def test_unparseable_names_fail_clearly_and_write_nothing(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    write_images(folder, 3)
    Image.new("RGB", (64, 64)).save(folder / "holiday.jpg")
    out = tmp_path / "f.h5"
    r = invoke(*extract_args(folder, out, tiny_model))
    assert r.exit_code != 0
    assert "holiday.jpg" in r.output and "@UTM_east@UTM_north" in r.output and "--manifest" in r.output
    assert not out.exists() and not out.with_suffix(".shards").exists()


def test_mixing_another_pooling_is_refused_and_another_size_is_recorded(images, tmp_path, tiny_model):
    out = tmp_path / "f.h5"
    assert invoke(*extract_args(images, out, tiny_model), catch_exceptions=False).exit_code == 0
    for extra, word in ((["--pooling", "gem"], "pooling"), (["--split", "x", "--pooling", "mean"], "pooling")):
        r = invoke(*extract_args(images, out, tiny_model, *extra))
        assert r.exit_code != 0 and word in r.output, r.output
    # Another resolution of the same weights, pooling and crop: a test split as D&C tests (Resize(256)).
    r = invoke("extract", "--images", images, "--out", out, "--model", tiny_model, "--image-size", 70, "--split", "y",
               "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert split_info(out, "y").attrs["image_size"] == 70 and split_info(out, "train").attrs["image_size"] == 56


def test_second_concurrent_writer_is_refused(images, tmp_path, tiny_model):
    out = tmp_path / "f.h5"
    with writer_lock(out):
        r = invoke(*extract_args(images, out, tiny_model))
    assert r.exit_code != 0 and "is being written by" in r.output
    assert invoke(*extract_args(images, out, tiny_model), catch_exceptions=False).exit_code == 0  # free again


def test_offline_hub_id_says_how_to_use_a_local_copy(images, tmp_path):
    r = invoke("extract", "--images", images, "--out", tmp_path / "f.h5", "--model", "facebook/dinov2-small",
               "--no-progress")
    assert r.exit_code != 0 and "--model DIR" in r.output and "facebook/dinov2-small" in r.output


def _bad_files(folder: Path) -> dict[str, str]:
    """One file per awkward kind, SF-XL named; value = expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    kinds = {}

    def name(i, tag):
        n = sfxl_name(551000 + i, 4181000 + i).replace("@@@@@@.jpg", f"@@@@{tag}@.jpg")
        kinds[n] = tag
        return folder / n

    (name(0, "zero")).write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, format="JPEG")
    name(1, "truncated").write_bytes(buf.getvalue()[:300])
    name(2, "text").write_bytes(b"not an image at all\n" * 20)
    Image.fromarray(rng.integers(0, 255, (90, 90), dtype=np.uint8), "L").save(name(3, "gray"), format="JPEG")
    Image.new("CMYK", (90, 90), (10, 200, 30, 0)).save(name(4, "cmyk"), format="JPEG")
    Image.fromarray(np.full((90, 90), 40000, np.uint16)).save(name(5, "wide").with_suffix(".png"), format="PNG")
    kinds[name(5, "wide").with_suffix(".png").name] = kinds.pop(name(5, "wide").name)
    Image.new("RGBA", (90, 90), (255, 0, 0, 0)).save(name(6, "alpha").with_suffix(".png"), format="PNG")
    kinds[name(6, "alpha").with_suffix(".png").name] = kinds.pop(name(6, "alpha").name)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 90), (0, 90, 0)).save(name(7, "rotated"), format="JPEG", exif=exif.tobytes())
    Image.new("1", (10000, 10000)).save(name(8, "bomb").with_suffix(".png"), format="PNG")
    kinds[name(8, "bomb").with_suffix(".png").name] = kinds.pop(name(8, "bomb").name)
    return {k: v for k, v in kinds.items() if (folder / k).exists()}


def test_bad_images_are_skipped_and_recorded_never_zero_rows(tmp_path, tiny_model):
    folder = tmp_path / "bad"
    kinds = _bad_files(folder)
    write_images(folder / "good", 3)
    out = tmp_path / "f.h5"
    r = invoke(*extract_args(folder, out, tiny_model), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    skipped = {k: v for k, v in kinds.items() if v in ("zero", "truncated", "text", "bomb")}
    assert f"{len(skipped)} failures" in r.output
    failures = dict(read_failures(out, "train"))
    assert set(failures) == set(skipped)
    assert "decompression bomb" in failures[next(k for k, v in skipped.items() if v == "bomb")]
    split = read_split(out, "train")
    assert split.embeddings.shape[0] == 3 + len(kinds) - len(skipped)
    assert set(split.labels["image_id"].to_list()) >= {k for k, v in kinds.items() if k not in skipped}
    assert np.isfinite(split.embeddings).all() and (np.abs(split.embeddings).sum(1) > 0).all()
    info = invoke("info", out, "--failures", catch_exceptions=False)
    assert "truncated" in info.output


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, forks):
    folder = tmp_path / "img"
    write_images(folder, 64, size=160)
    reference = tmp_path / "ref.h5"
    assert invoke(*extract_args(folder, reference, tiny_model), catch_exceptions=False).exit_code == 0
    ref = read_split(reference, "train")

    out = tmp_path / "f.h5"
    shards = out.with_suffix(".shards")
    killed_with = []
    for wanted in (1, 4):  # kill after the first shard, then again mid-run
        kill_9_when(forks, extract_args(folder, out, tiny_model), lambda: len(list(shards.glob("train/*/0*.h5"))) >= wanted)
        killed_with.append(len(list(shards.glob("train/*/0*.h5"))))
        if out.exists():  # whatever is there must open
            list_splits(out)
    assert 0 < killed_with[0] < 8, killed_with  # the kill really happened mid-run
    # The resume runs in this process: what it must find is on disk, not in the killed one.
    r = invoke(*extract_args(folder, out, tiny_model))
    assert r.exit_code == 0, r.output
    got = read_split(out, "train")
    assert got.labels["image_id"].to_list() == ref.labels["image_id"].to_list()
    assert np.array_equal(got.embeddings, ref.embeddings)
    assert not list(tmp_path.glob("**/.*.tmp"))


class SimulatedCrash(Exception):
    pass


def test_a_crash_while_replacing_the_store_keeps_the_old_one(images, tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "f.h5"
    assert invoke(*extract_args(images, out, tiny_model), catch_exceptions=False).exit_code == 0
    before = read_split(out, "train").embeddings
    import dcfeat.atomic as atomic

    real = atomic.replace_atomically

    def crash_on_store(tmp, final):
        if final == out:
            raise SimulatedCrash("before the store is renamed into place")
        real(tmp, final)

    monkeypatch.setattr(atomic, "replace_atomically", crash_on_store)
    more = tmp_path / "more"
    write_images(more, 4, seed=9)
    with pytest.raises(SimulatedCrash):
        invoke(*extract_args(more, out, tiny_model, "--split", "test"), catch_exceptions=False)
    assert [s.name for s in list_splits(out)] == ["train"]
    assert np.array_equal(read_split(out, "train").embeddings, before)
    monkeypatch.setattr(atomic, "replace_atomically", real)
    assert invoke(*extract_args(more, out, tiny_model, "--split", "test"), catch_exceptions=False).exit_code == 0
    assert read_split(out, "test").embeddings.shape[0] == 4


def _rank(rank: int, port: int, output: str, args: list[str]) -> None:
    """`dcfeat ARGS...` as rank `rank` of two, with the environment torchrun gives each process it starts,
    its stdout and stderr in the file `output`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    log = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    from dcfeat.cli import main

    main(args)


def test_two_torchrun_ranks_equal_one_process(tmp_path, tiny_model, forks):
    """Two ranks as `torchrun --nproc-per-node 2 -m dcfeat extract` starts them (its environment: RANK,
    WORLD_SIZE, MASTER_ADDR …), from the `forks` server: a launcher and two new interpreters cost ~14 s of CPU."""
    folder = tmp_path / "img"
    write_images(folder, 40)
    single = tmp_path / "one.h5"
    assert invoke(*extract_args(folder, single, tiny_model), catch_exceptions=False).exit_code == 0
    out = tmp_path / "two.h5"
    with socket.socket() as sock:  # a free port: tests may run beside other torchrun jobs
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [str(a) for a in extract_args(folder, out, tiny_model)]
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    ranks = [forks.Process(target=_rank, args=(rank, port, str(logs[rank]), args)) for rank in (0, 1)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join()
    output = [log.read_text() for log in logs]
    assert [proc.exitcode for proc in ranks] == [0, 0], output
    assert [text.count("rows written") for text in output] == [1, 0]  # rank 0 reports for all
    a, b = read_split(single, "train"), read_split(out, "train")
    assert a.labels.equals(b.labels)
    assert np.array_equal(a.embeddings, b.embeddings)


def test_image_files_dcfeat_does_not_read_are_listed_on_stderr(images, tmp_path, tiny_model):
    from PIL import Image

    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(images / "d0" / "animation.gif")
    r = invoke(*extract_args(images, tmp_path / "f.h5", tiny_model))
    assert r.exit_code == 0, r.output
    assert "skipped d0/animation.gif: .gif files are not read by dcfeat" in r.stderr
    assert "RANDOM BACKBONE" in r.stderr and "RANDOM BACKBONE" not in r.stdout  # warnings apart from results


def test_unlabelled_photos_are_cached_for_predict_and_refused_by_training(tmp_path, tiny_model, city_store):
    """Photos of any names whose positions are unknown: `extract --unlabelled`, then `predict --feats`."""
    from PIL import Image

    photos = tmp_path / "new"
    photos.mkdir()
    for i in range(5):
        Image.fromarray(np.full((80, 90, 3), 40 * i, np.uint8)).save(photos / f"holiday {i}.jpg")
    store = tmp_path / "f.h5"
    r = invoke(*extract_args(photos, store, tiny_model, "--split", "new", "--unlabelled"))
    assert r.exit_code == 0, r.output
    labels = read_split(store, "new", positions=False).labels
    assert labels["image_id"].to_list() == [f"holiday {i}.jpg" for i in range(5)]
    assert labels["utm_east"].null_count() == 5 and split_info(store, "new").attrs["labelled"] is False
    r = invoke("train", "--feats", store, "--split", "new", "--out", tmp_path / "run", "--no-progress")
    assert r.exit_code == 2 and "positions are unknown" in r.output and "dcfeat predict --feats" in r.output
    assert not (tmp_path / "run").exists()
    assert invoke("info", store, "--verify").exit_code == 0
    # A run of the same backbone answers for them from the cache.
    write_images(tmp_path / "train", 24)
    assert invoke(*extract_args(tmp_path / "train", store, tiny_model)).exit_code == 0
    assert invoke("train", "--feats", store, "--M", 200, "--min-images-per-class", 1, "--epochs", 1, "--dim", 8,
                  "--out", tmp_path / "run2", "--no-progress").exit_code == 0
    r = invoke("predict", "--run", tmp_path / "run2", "--feats", store, "--split", "new", "--out", tmp_path / "p.csv",
               "--no-progress")
    assert r.exit_code == 0, r.output
    import polars as pl

    assert pl.read_csv(tmp_path / "p.csv")["image_id"].unique().sort().to_list() == [f"holiday {i}.jpg" for i in range(5)]
