"""`dcfeat.Localizer`: the core predict and serve call, on images, paths, bytes, PIL images and features."""

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dcfeat import localizer as localizer_module
from dcfeat.errors import BadInput
from dcfeat.localizer import Answer, Localizer
from dcfeat.predict import predict_files
from dcfeat.store import read_split
from tests.conftest import HOSTILE_KINDS, ROOT, hostile_image_bytes


@pytest.fixture(scope="module")
def loc(tiny_run) -> Localizer:
    return Localizer.from_run(tiny_run, device="cpu", k=3)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / f"photo{i}.png")
    return sorted(folder.iterdir())


def same_answers(answers: list[Answer], frame: pl.DataFrame) -> None:
    """Each answer holds the table's rows of its image: cells, probabilities, position, confidence."""
    assert len(answers) == frame["image_id"].n_unique()
    for a in answers:
        rows = frame.filter(pl.col("image_id") == a.image_id).sort("rank")
        assert [c["class"] for c in a.top_k] == rows["class"].to_list()
        assert [c["probability"] for c in a.top_k] == pytest.approx(rows["probability"].to_list(), abs=1e-6)
        assert (a.lat, a.lon) == pytest.approx((rows["lat"][0], rows["lon"][0]))
        position = ("utm_east", "utm_north") if "utm_east" in rows.columns else ("cell_east", "cell_north")
        assert (a.utm_east, a.utm_north) == (rows[position[0]][0], rows[position[1]][0])
        assert a.confidence == rows["confidence"][0] and a.radius_m == rows["radius_m"][0]


def test_locate_paths_bytes_and_pil_images_answer_as_predict_does(loc, tiny_run, photos, tmp_path):
    predicted = predict_files(tiny_run, tmp_path / "p.parquet", images=photos[0].parent, k=3, device="cpu",
                              progress=False, workers=0).frame
    by_name = predicted.with_columns(pl.col("image_id").map_elements(lambda i: str(photos[0].parent / i),
                                                                     return_dtype=pl.String))
    same_answers(loc.locate(photos), by_name)
    same_answers(loc.locate([str(p) for p in photos]), by_name)
    as_bytes = loc.locate([p.read_bytes() for p in photos], ids=[str(p) for p in photos])
    same_answers(as_bytes, by_name)
    with Image.open(photos[1]) as im:
        pil = loc.locate([im.copy()], ids=[str(photos[1])])
    same_answers(pil, by_name.filter(pl.col("image_id") == str(photos[1])))
    array = loc.locate(np.asarray(Image.open(photos[2])), ids=[str(photos[2])])  # one image, no list
    same_answers(array, by_name.filter(pl.col("image_id") == str(photos[2])))


def test_locate_returns_one_answer_per_image_in_order_even_for_unusable_ones(loc, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    found = loc.locate([photos[0], broken, b"", photos[0], 42])
    assert [a.image_id for a in found] == [str(photos[0]), str(broken), "#2", str(photos[0]), "#4"]
    assert found[0].error is None and found[0].top_k == found[3].top_k  # the same image twice: two answers
    assert "UnidentifiedImageError" in found[1].error and found[1].lat is None and found[1].top_k == []
    assert "not an image: int" in found[4].error
    assert all(a.run_status == "complete; RANDOM BACKBONE; UNCALIBRATED" for a in found)


def test_files_of_other_formats_get_an_error_answer_each_not_a_traceback(loc, photos, tmp_path):
    """H1: a DDS or SPIDER upload raised NotImplementedError or AttributeError out of `locate`."""
    named = tmp_path / "dds.jpg"
    named.write_bytes(hostile_image_bytes("dds"))
    found = loc.locate([named, *(hostile_image_bytes(kind) for kind in HOSTILE_KINDS), photos[0]])
    assert [a.error is None for a in found] == [False] * (1 + len(HOSTILE_KINDS)) + [True]
    assert all("JPEG, PNG, WebP, TIFF or BMP" in a.error and a.top_k == [] for a in found[:-1])


def test_an_answer_is_json_ready_with_its_top_k(loc, photos):
    import json

    [answer] = loc.locate([photos[0]], k=2)
    d = answer.to_dict()
    json.dumps(d, allow_nan=False)
    assert set(d) == {"image", "lat", "lon", "utm", "confidence", "radius_m", "abstained", "threshold_m",
                      "run_status", "top_k"}
    assert set(d["utm"]) == {"east", "north", "zone", "letter"} and d["utm"]["zone"] == 10
    assert [c["rank"] for c in d["top_k"]] == [1, 2] and d["confidence"] is None and d["abstained"] is False
    assert not {"image_id", "confidence", "run_status"} & set(d["top_k"][0])


def test_locate_features_answers_as_predict_from_cached_features(loc, tiny_run, tmp_path):
    store = tiny_run.parent / "f.h5"
    predicted = predict_files(tiny_run, tmp_path / "p.parquet", feats=store, split="train", k=3, device="cpu").frame
    split = read_split(store, "train", dtype="float32")
    ids = split.labels["image_id"].to_list()
    same_answers(loc.locate_features(split.embeddings, ids=ids), predicted)
    frame = loc.locate_features(split.embeddings, ids=ids, as_frame=True)
    assert frame.drop("abstained").equals(predicted.drop("abstained", "error_m"))  # the split's labels: error_m
    assert loc.locate_features(split.embeddings[0])[0].image_id == "#0"  # one row, no ids
    with pytest.raises(BadInput, match=r"takes \(n, 32\) backbone features"):
        loc.locate_features(np.zeros((2, 5)))
    with pytest.raises(BadInput, match="one id per row"):
        loc.locate_features(split.embeddings[:2], ids=["a"])


def test_min_confidence_needs_a_calibrated_run_and_marks_abstentions(loc, calibrated_run, photos):
    with pytest.raises(BadInput, match="needs a calibrated run"):
        loc.locate(photos, min_confidence=0.5)
    sure = Localizer.from_run(calibrated_run, device="cpu")
    found = sure.locate(photos)
    confidences = [a.confidence for a in found]
    assert all(0 < c < 1 for c in confidences) and all(a.radius_m > 0 for a in found)
    assert all(a.threshold_m == 150 for a in found)
    middle = float(np.median(confidences))
    marked = sure.locate(photos, min_confidence=middle)
    assert [a.abstained for a in marked] == [c < middle for c in confidences]
    for bad in (0, 2, -1):
        with pytest.raises(BadInput, match="in \\(0, 1\\]"):
            sure.locate(photos, min_confidence=bad)


def test_an_answer_takes_its_position_from_the_table_not_the_cell(loc, photos, monkeypatch):
    """Where predictions() gives a position beside the cell centre, the answer is that position."""
    real = localizer_module.predictions

    def with_positions(*args, **kwargs):
        frame = real(*args, **kwargs)
        return frame.with_columns(utm_east=pl.col("cell_east") + 7.0, utm_north=pl.col("cell_north") - 3.0,
                                  lat=pl.lit(37.5), lon=pl.lit(-122.25))

    monkeypatch.setattr(localizer_module, "predictions", with_positions)
    [answer] = loc.locate([photos[0]])
    cell = answer.top_k[0]
    assert (answer.utm_east, answer.utm_north) == (cell["cell_east"] + 7.0, cell["cell_north"] - 3.0)
    assert (answer.lat, answer.lon) == (37.5, -122.25) and cell["utm_east"] == answer.utm_east


def test_import_dcfeat_loads_no_torch_until_the_localizer_is_asked_for():
    code = ("import sys, dcfeat\nassert 'torch' not in sys.modules, 'torch at import'\n"
            "L = dcfeat.Localizer\nassert 'torch' in sys.modules and L.__name__ == 'Localizer'\n"
            "from dcfeat import Localizer\nassert Localizer is L\n"
            "try:\n    dcfeat.Nothing\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "has no attribute 'Nothing'" in out.stdout


def test_odd_image_modes_and_empty_arrays_get_their_own_answer_with_an_error(loc, photos):
    rgb = Image.open(photos[0]).convert("RGB")
    odd = [rgb.convert("HSV"), rgb.convert("RGBA").convert("RGBa"), rgb.convert("LA").convert("La")]
    empty = [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5, 3), np.uint8)]
    found = loc.locate([*odd, *empty, photos[1]])
    assert len(found) == 6
    assert [a.error is None for a in found] == [True, True, True, False, False, True]
    assert all("empty" in a.error for a in found[3:5])
    assert [c["class"] for c in found[1].top_k] == [c["class"] for c in loc.locate([rgb.convert("RGBA")])[0].top_k]


@pytest.mark.parametrize("options, words", [({"k": 0}, "k=0"), ({"k": -3}, "k=-3"), ({"k": 2.5}, "k=2.5"),
                                            ({"k": True}, "k=True"), ({"min_confidence": True}, "min_confidence")])
def test_k_and_min_confidence_are_checked_naming_the_argument(loc, photos, options, words):
    feats = np.random.default_rng(0).standard_normal((2, loc.dim))
    for call in (lambda: loc.locate(photos[:1], **options), lambda: loc.locate_features(feats, **options)):
        with pytest.raises(BadInput, match=words.replace("[", r"\[")):
            call()


def test_a_descriptor_row_that_is_not_finite_gets_an_answer_with_an_error(loc):
    feats = np.random.default_rng(0).standard_normal((3, loc.dim)).astype(np.float32)
    feats[1, 4] = np.nan
    found = loc.locate_features(feats, ids=["a", "b", "c"])
    assert [a.image_id for a in found] == ["a", "b", "c"]
    assert found[0].error is None and found[2].error is None and "not finite" in found[1].error
    assert found[1].lat is None and found[1].top_k == []
    alone = loc.locate_features(feats[[0, 2]], ids=["a", "c"])
    assert [a.top_k for a in alone] == [found[0].top_k, found[2].top_k]
