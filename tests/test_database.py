"""The cell-sorted database (dcfeat.database), `dcfeat index` and `evaluate --database`: its search is the
hybrid's exact search among the candidate cells' rows, read from disk; appending survives kill -9."""

import json
import os
import shutil
import signal

import numpy as np
import polars as pl
import pytest
import torch

from dcfeat import database as database_module
from dcfeat.database import MANIFEST, CellDatabase, NewRows, unit_rows
from dcfeat.devices import gathered_products, sampled_products
from dcfeat.geo import Places, metres_between
from dcfeat.partition import assign_classes, cell_of, centres_of, partition
from dcfeat.shards import write_split
from dcfeat.store import read_split
from tests.conftest import invoke, kill_9_when, refused

D, CLASSES = 16, 40


def _rows(n, seed, classes=CLASSES, source=None):
    rng = np.random.default_rng(seed)
    labels = pl.DataFrame({"row": np.arange(n), "image_id": [f"s{seed}/{i}.jpg" for i in range(n)],
                           "utm_east": rng.uniform(0, 100, n), "utm_north": rng.uniform(0, 100, n),
                           "utm_zone": np.full(n, 10, np.int8), "utm_letter": ["S"] * n})
    emb = unit_rows(torch.as_tensor(rng.standard_normal((n, D)), dtype=torch.float32))
    # The last 3 classes hold no row; chunks of 7 rows, as a writer reads them.
    return NewRows(rng.integers(0, classes - 3, n), rng.random(n) < 0.2, labels,
                   [emb[i:i + 7] for i in range(0, n, 7)], source or {"split": f"s{seed}", "plan_id": f"p{seed}"})


def _queries(nq=23, seed=5):
    rng = np.random.default_rng(seed)
    q = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((nq, D)), dtype=torch.float32), dim=1)
    cells = np.stack([rng.choice(CLASSES, 4, replace=False) for _ in range(nq)])
    cells[3, 2:] = -1  # fewer cells than the others
    cells[4] = -1  # no cell: no candidate
    cells[5] = [CLASSES - 1, CLASSES - 2, 0, 1]  # two empty cells beside two others
    return q, cells, rng.normal(size=cells.shape).astype(np.float32)


def _brute(db: CellDatabase, q, cells, k, bias=None):
    """Every query's candidates (its cells' rows, slot by slot, each in row order), scored in float64, stable."""
    emb = np.concatenate([np.asarray(s.embeddings.cpu() if isinstance(s.embeddings, torch.Tensor) else s.embeddings,
                                     np.float64) for s in db.segments])
    cls = db.table["class"].to_numpy()
    rows, cos = np.full((len(q), k), -1), np.full((len(q), k), -np.inf)
    for i in range(len(q)):
        cand = [(r, j) for j, c in enumerate(cells[i]) if c >= 0 for r in np.flatnonzero(cls == c)]
        r = np.array([c[0] for c in cand], int)
        s = emb[r] @ q[i].numpy().astype(np.float64)
        score = s + (np.array([bias[i, c[1]] for c in cand]) if bias is not None else 0)
        best = np.argsort(-score, kind="stable")[:k]
        rows[i, :len(best)], cos[i, :len(best)] = r[best], s[best]
    return rows, cos


@pytest.fixture
def two_segments(tmp_path):
    db = CellDatabase.build(_rows(300, 1), num_classes=CLASSES, space="raw", built_for={"run": "r"})
    return db.save(tmp_path / "db").add(_rows(120, 2))


@pytest.mark.parametrize("max_elements", [16, 16 * 40, 1 << 25])  # one query per block, a few, all at once
def test_search_is_brute_force_among_the_cells_rows_with_or_without_bias(two_segments, max_elements):
    q, cells, bias = _queries()
    k = 9
    for b in (None, bias):
        s, rows, cos = two_segments.search(q, cells, k, bias=b, max_elements=max_elements)
        want_rows, want_cos = _brute(two_segments, q, cells, k, b)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(cos, want_cos, atol=1e-5)
        assert s.shape == rows.shape == cos.shape == (len(q), k)
        assert (rows[4] == -1).all() and np.isneginf(s[4]).all()
    # With the bias the scores are the cosines plus their cell slot's bias.
    s, rows, cos = two_segments.search(q, cells, k, bias=bias)
    cls = two_segments.table["class"].to_numpy()
    for i in range(len(q)):
        for j in np.flatnonzero(rows[i] >= 0):
            slot = int(np.flatnonzero(cells[i] == cls[rows[i, j]])[0])
            assert s[i, j] == pytest.approx(cos[i, j] + bias[i, slot], abs=1e-6)
    assert (rows[:, 0] >= 0).sum() == len(q) - 1 and (rows >= 300).any()  # both segments answer


def test_a_database_on_disk_reads_only_its_candidate_cells_rows_once_per_block(two_segments, monkeypatch):
    q, cells, _ = _queries()
    want = two_segments.search(q, cells, 9)
    read, preadv = [], os.preadv

    def recorded(fd, buffers, offset):
        read.append((fd, offset, sum(len(b) for b in buffers)))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(database_module.os, "preadv", recorded)
    got = two_segments.search(q, cells, 9)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    union = np.unique(cells[cells >= 0])
    for seg in two_segments.segments:
        row_bytes = 2 * D
        runs = [((o - seg.embeddings.offset) // row_bytes, n // row_bytes) for fd, o, n in read
                if fd == seg.file.fileno()]
        got_rows = np.concatenate([np.arange(a, a + n) for a, n in runs])
        expected = np.concatenate([np.arange(seg.starts[c], seg.starts[c] + seg.counts[c]) for c in union])
        np.testing.assert_array_equal(np.sort(got_rows), np.sort(expected))  # each candidate row once, no other
        assert len(runs) < len(union)  # adjacent cells read at once


def test_a_saved_database_opens_as_it_was_built(tmp_path):
    built = CellDatabase.build(_rows(300, 1), num_classes=CLASSES, space="raw", built_for={"run": "r"})
    opened = built.save(tmp_path / "db")
    q, cells, bias = _queries()
    for a, b in zip(built.search(q, cells, 9, bias), opened.search(q, cells, 9, bias)):
        np.testing.assert_array_equal(a, b)
    rows = np.array([[0, 5, -1]])
    np.testing.assert_array_equal(opened.ids(rows), built.ids(rows))
    assert opened.ids(rows)[0, 2] is None and np.isnan(opened.places(rows).east[0, 2])
    assert (opened.rows, opened.outside, opened.cells(), opened.built_for) == (300, built.outside, CLASSES - 3,
                                                                             {"run": "r"})
    header = json.loads((tmp_path / "db" / MANIFEST).read_text())
    assert header["format"] == 1 and header["dtype"] == "float16" and header["rows"] == 300
    # The rows are sorted by class; a row's source row and image id travel with it.
    table = pl.read_parquet(tmp_path / "db" / "segments" / "000000" / "rows.parquet")
    assert (np.diff(table["class"].to_numpy()) >= 0).all()
    assert table["image_id"].to_list() == [f"s1/{r}.jpg" for r in table["row"].to_list()]


def test_adding_a_source_twice_adds_it_once(two_segments):
    again = two_segments.add(_rows(120, 2))
    assert again.rows == 420 and len(again.segments) == 2


def test_search_all_is_exact_retrieval_over_every_segment(two_segments):
    q, _, _ = _queries()
    s, rows = two_segments.search_all(q, 7)
    emb = np.concatenate([np.asarray(seg.embeddings, np.float64) for seg in two_segments.segments])
    cos = emb @ q.numpy().T.astype(np.float64)
    want = np.argsort(-cos.T, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(s, np.take_along_axis(cos.T, want, 1), atol=1e-5)
    assert (rows >= 300).any()


# --- rows outside every class ---------------------------------------------------------------------------------

def test_rows_outside_every_class_go_to_the_nearest_class_cell_of_their_zone_else_across():
    rng = np.random.default_rng(0)
    east, north = 550000 + rng.uniform(0, 2000, 3000), 4180000 + rng.uniform(0, 2000, 3000)
    part = partition(east[:2000], north[:2000], np.full(2000, 10), np.array(["S"] * 2000), M=20, N=2,
                     min_images_per_class=2)
    # One photo in zone 11, which holds no class: measured across the zone edge.
    zone = np.append(np.full(3000, 10, np.int8), np.int8(11))
    east, north = np.append(east, 166000.0), np.append(north, 4181000.0)
    labels = pl.DataFrame({"utm_east": east, "utm_north": north, "utm_zone": zone, "utm_letter": ["S"] * 3001})
    ids, outside, metres = assign_classes(part.classes, labels, 20.0)
    c = part.classes
    p, q = cell_of(east[:3000], north[:3000], 20.0)
    d2 = (p[:, None] - c["p"].to_numpy()) ** 2 + (q[:, None] - c["q"].to_numpy()) ** 2
    np.testing.assert_array_equal(ids[:3000], d2.argmin(1))  # the nearest cell centre, ties to the lower id
    np.testing.assert_allclose(metres[:3000], 20.0 * np.sqrt(d2.min(1)))
    assert outside[:3000].sum() > 500 and metres[:3000].max() > 20 * 8  # some beyond the rings looked up first
    assert (metres[:3000][~outside[:3000]] == 0).all()
    centres = centres_of(c, np.arange(c.height))
    here = Places(np.array([166010.0]), np.array([4181010.0]), np.array([11]), np.array(["S"]))
    across = metres_between(here, Places(*(np.asarray(a)[None] for a in (centres.east, centres.north, centres.zone,
                                                                           centres.letter))))[0]
    assert outside[3000] and ids[3000] == across.argmin() and metres[3000] == pytest.approx(across.min())


# --- the stage and the commands --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def city_db(city_store, city_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "db"
    r = invoke("index", "--run", city_run, "--feats", city_store, "--split", "test-db", "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "1,320 photos" in r.output
    return out


def test_evaluate_with_the_database_answers_as_with_the_database_split(city_store, city_run, city_db, tmp_path):
    reports = {}
    for how in (["--database", city_db], ["--database-split", "test-db"]):
        out = tmp_path / how[0].strip("-")
        r = invoke("evaluate", "--feats", city_store, "--run", city_run, *how, "--out", out, "--repeats", 1,
                   "--mode", "all")
        assert r.exit_code == 0, r.output
        reports[how[0]] = (json.loads((out / "report.json").read_text()),
                           pl.read_parquet(out / "predictions.parquet"))
    (a, pa), (b, pb) = reports["--database"], reports["--database-split"]
    assert a["database"] == str(city_db) and b["database_split"] == "test-db"
    for m in ("hybrid", "adaptive"):
        assert a["methods"][m]["recall"] == b["methods"][m]["recall"]
        assert a["methods"][m]["mean_candidates"] == b["methods"][m]["mean_candidates"]
        np.testing.assert_array_equal(np.array(pa[f"{m}_east"].to_list()), np.array(pb[f"{m}_east"].to_list()))
    # Measured 0.65 / 0.64 (the hybrid's LR@1 on this city with the database-split search it replaced: 0.655).
    assert a["methods"]["hybrid"]["recall"]["1"] > 0.6


def test_the_hybrid_finds_the_rows_the_database_files_under_its_top_cells(city_store, city_run, city_db):
    from dcfeat.evaluate import hybrid
    from dcfeat.run import load_run

    run = load_run(city_run)
    q = read_split(city_store, "test", dtype=np.float32)
    db = CellDatabase.open(city_db)
    got = hybrid(run, q, db, 10, 5, torch.device("cpu"))
    top = run.model.topk(q.embeddings, 5)[0]
    rows, _ = _brute(db, torch.nn.functional.normalize(run.model.embed(q.embeddings), dim=1), top, 10)
    np.testing.assert_array_equal(got.ref, rows)
    assert (rows[:, -1] >= 0).mean() > 0.5  # most queries have 10 candidates: the comparison is not vacuous


def test_info_describes_a_database(city_db, city_run):
    r = invoke("info", city_db)
    assert r.exit_code == 0, r.output
    for words in ("1,320 rows", "134 of the run's 134 cells", "outside every class cell", "1 segment",
                  str(city_run.resolve()), "segment 000000", "'test-db'"):
        assert words in r.output.replace("\n", " "), (words, r.output)


def _copy(folder, tmp_path, name="db"):
    shutil.copytree(folder, tmp_path / name)
    return tmp_path / name


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill_when_called(args: list[str]) -> None:
    """`dcfeat ARGS[1:]` killed -9 by itself on the first call of ARGS[0], "MODULE:FUNCTION" of dcfeat."""
    import importlib

    module, name = args[0].split(":")

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(importlib.import_module(f"dcfeat.{module}"), name, die)
    from tests.conftest import run_dcfeat_quietly

    run_dcfeat_quietly(args[1:])


@pytest.mark.slow
# The new segment's embeddings written, not its rows; the segment renamed in, no manifest written; the new
# manifest written under its temporary name, not renamed.
@pytest.mark.parametrize("where", ["database:_table", "database:write_text", "atomic:replace_atomically"])
def test_an_add_killed_at_any_point_leaves_the_database_whole_and_the_same_command_ends_as_one_add(
        city_store, city_run, city_db, tmp_path, forks, where):
    whole = _copy(city_db, tmp_path, "whole")
    add = ["index", "--add", "--run", city_run, "--feats", city_store, "--split", "val", "--no-progress", "--out"]
    assert invoke(*add, whole).exit_code == 0
    db = _copy(city_db, tmp_path)
    before = _files(db)
    kill_9_when(forks, [where, *add, db], lambda: False, target=_kill_when_called)
    opened = CellDatabase.open(db)  # the old database, whole: its manifest and listed segments unchanged
    assert opened.rows == 1320 and {k: v for k, v in _files(db).items() if k in before} == before
    assert set(_files(db)) > set(before)  # killed midway: the add had begun to write
    assert invoke(*add, db).exit_code == 0
    assert _files(db) == _files(whole)  # byte for byte: nothing left of the killed add
    assert CellDatabase.open(db).rows == 1420


def test_index_refuses_what_it_cannot_use(city_store, city_run, city_db, tmp_path):
    r = invoke("index", "--run", city_run, "--feats", city_store, "--out", city_db, "--no-progress")
    refused(r, "bad input", str(city_db), "--add")
    plain = tmp_path / "plain"
    plain.mkdir()
    for args in (["index", "--add", "--run", city_run, "--feats", city_store, "--out", plain],
                 ["evaluate", "--feats", city_store, "--run", city_run, "--database", plain, "--out", tmp_path / "e"]):
        refused(invoke(*args), "bad input", str(plain), "not a database", "dcfeat index")
    newer = _copy(city_db, tmp_path, "newer")
    header = json.loads((newer / MANIFEST).read_text())
    (newer / MANIFEST).write_text(json.dumps({**header, "format": 99}))
    refused(invoke("info", newer), "bad input", str(newer), "newer", "upgrade dcfeat")
    broken = _copy(city_db, tmp_path, "broken")
    (broken / MANIFEST).write_text("{half")
    refused(invoke("info", broken), "damaged store", str(broken / MANIFEST), "dcfeat index")
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--database", city_db, "--space", "raw",
               "--out", tmp_path / "e")
    refused(r, "bad input", "--space raw", "projected")
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--database", city_db, "--database-split",
               "test-db", "--out", tmp_path / "e")
    refused(r, "bad input", "--database and --database-split")


def test_a_database_of_another_run_or_features_is_refused(city_store, city_run, city_db, tmp_path):
    from safetensors.torch import load_file, save_file

    other = _copy(city_run, tmp_path, "other-run")
    state = load_file(str(other / "model.safetensors"))
    key = next(k for k in state if k.startswith("projection"))
    state[key] = state[key] * 1.5  # another projection: another space
    save_file(state, str(other / "model.safetensors"))
    for args in (["index", "--add", "--split", "val", "--out", _copy(city_db, tmp_path), "--no-progress"],
                 ["evaluate", "--mode", "hybrid", "--database", city_db, "--out", tmp_path / "e"]):
        r = invoke(*args, "--run", other, "--feats", city_store)
        refused(r, "incompatible", "projection", "dcfeat index --run")
    # A split of another model's features.
    split = read_split(city_store, "val")
    store = tmp_path / "other" / "f.h5"
    write_split(store, "val", split.embeddings, split.labels.drop("row"),
                {**{k: split.attrs[k] for k in ("model", "pooling", "image_size", "dim")}, "model_fingerprint": "v2-x"})
    r = invoke("index", "--add", "--run", city_run, "--feats", store, "--split", "val", "--out",
               _copy(city_db, tmp_path, "db2"), "--no-progress")
    refused(r, "incompatible", "split 'val'", "model_fingerprint")


def test_search_refuses_queries_of_another_width(two_segments):
    with pytest.raises(ValueError, match="dimensions"):
        two_segments.search(torch.zeros(2, D + 1), np.zeros((2, 1), np.int64), 3)
    assert database_module.FORMAT == 1


@pytest.mark.parametrize("products", [sampled_products, gathered_products])
def test_sampled_products_are_the_asked_entries_of_the_full_product(products):
    rng = np.random.default_rng(3)
    a = torch.as_tensor(rng.standard_normal((5, D)), dtype=torch.float32)
    b = torch.as_tensor(rng.standard_normal((30, D)), dtype=torch.float32)
    per_row = torch.tensor([3, 0, 4, 1, 0])  # rows asking for nothing, columns asked twice, out of order
    columns = torch.tensor([7, 2, 7, 29, 0, 5, 5, 11])
    got = products(a, b, per_row, columns)
    row = torch.repeat_interleave(torch.arange(5), per_row)
    np.testing.assert_allclose(got.numpy(), (a @ b.T)[row, columns].numpy(), rtol=1e-5, atol=1e-5)
    assert products(a, b, torch.zeros(5, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)).shape == (0,)
