"""The README's two commands: `make demo` (the demo, at a tiny size here) and `make test`."""

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines.readme import reference
from tests.conftest import ROOT, invoke

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    block = re.search(r"```\n(.*?)```", README, flags=re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    assert readme_commands() == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: install\n\t\$\(PYTHON\) -m dcfeat demo$", makefile, flags=re.M)
    assert re.search(r"^test: install\n\t\$\(PYTHON\) -m pytest", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_cli_reference_is_current():
    block = (ROOT / "docs" / "cli.md").read_text().split("<!-- cli-reference:start -->\n")[1].split("<!-- cli-reference:end -->")[0]
    assert block == reference(), "run `python pipelines/readme.py`"


# A feature city that trains in ~1 s: 1,184 train rows, 57 classes, 100 test queries. Measured: classify LR@1
# 0.70, where a cell drawn at random lies within 25 m of a query for 4.8 % of them.
TINY_CITY = {"streets": 4, "block_m": 60.0, "dim": 64, "place_dim": 32, "queries": 100, "val_queries": 50}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, dict]:
    """The demo's photos at --streets 2, rendered once (~2 s of CPU): the folder and each split's paths. The
    interrupted demo must render these same photos; the end-to-end demo starts from a copy of them."""
    from dcfeat.synthetic.photos import render_city

    folder = tmp_path_factory.mktemp("rendered") / "images"
    return folder, render_city(folder, streets=2)


@pytest.mark.slow
def test_demo_end_to_end_at_a_tiny_size(tmp_path, tiny_model, monkeypatch, rendered):
    import dcfeat.demo
    from dcfeat.demo import run_demo

    shutil.copytree(rendered[0], tmp_path / "demo" / "images")  # rendering itself: the interrupted demo's test
    # The rendered photos here; the feature city once, in the command below.
    result = run_demo(tmp_path / "demo", streets=2, image_size=56, epochs=3, workers=0, progress=False,
                      model=str(tiny_model), city=None)
    assert result.city_report is None and not (tmp_path / "demo" / "city").exists()
    report = result.report
    assert set(report["methods"]) == {"classify", "classify-centre", "retrieve", "hybrid", "fused", "adaptive"} and report["random_backbone"]
    for m in report["methods"].values():
        assert set(m) >= {"recall", "median_error_m", "mean_error_m", "queries_per_s", "ms_per_query"}
        assert set(m["recall"]) == {"1", "5", "10", "20"}
    for key in ("coverage", "queries", "database_rows", "threshold_m", "device", "options", "files", "classes"):
        assert key in report
    on_disk = json.loads(result.paths["report"].read_text())
    assert on_disk["methods"] == report["methods"]
    assert all(p.is_file() for p in result.paths.values())
    # The command on the same root reuses the rendered images and the complete store, makes a new run
    # folder and prints the table.
    monkeypatch.setattr(dcfeat.demo, "demo_backbone", lambda root, prefer_pretrained=True: str(tiny_model))
    make_city = dcfeat.demo.make_city
    monkeypatch.setattr(dcfeat.demo, "make_city", lambda **city: make_city(**{**city, **TINY_CITY}))
    r = invoke("demo", "--root", tmp_path / "demo", "--streets", 2, "--image-size", 56, "--epochs", 1,
               "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    for word in ("classify", "retrieve (projected)", "hybrid (projected)", "LR@1", "RANDOM BACKBONE", "error_cdf",
                 "rendered photos, backbone tiny-dinov2", "feature city: synthetic features (no images, no backbone)",
                 "feature city report"):
        assert word in r.output, word
    photos, city_table = r.stdout.split("feature city: synthetic features")
    assert "RANDOM BACKBONE" in photos and "RANDOM BACKBONE" not in city_table
    (city_report,) = (tmp_path / "demo" / "city" / "runs").glob("2*/eval/test/report.json")
    city = json.loads(city_report.read_text())
    assert not city["random_backbone"] and city["queries"] == 100 and city["classes"] == 57
    assert city["methods"]["classify"]["recall"]["1"] >= 0.5  # learnt: ten times what chance gives
    assert city["methods"]["fused"]["fitted_against"] == "test-db"  # the feature city ends calibrated, fused too
    reports = sorted((tmp_path / "demo" / "runs").glob("2*/eval/test/report.json"))
    assert len(reports) == 2 and result.paths["report"] in reports
    assert all(json.loads(p.read_text())["queries"] == report["queries"] for p in reports)


def test_the_demo_backbone_says_which_case_applied(tmp_path, monkeypatch, capsys):
    import dcfeat.demo as demo

    monkeypatch.setattr(demo, "random_vit", lambda folder: folder)
    monkeypatch.setattr(demo, "cached_checkpoint", lambda repo: None)
    calls = []

    def no_route(repo, **kw):
        calls.append(repo)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(demo, "snapshot_download", no_route)
    monkeypatch.setattr(demo, "hub_unreachable", lambda: "offline: HF_HUB_OFFLINE is set")
    assert demo.demo_backbone(tmp_path).endswith("dinov2-small-random") and not calls  # offline: never tried
    monkeypatch.setattr(demo, "hub_unreachable", lambda: None)  # the hub answers, the download fails
    assert demo.demo_backbone(tmp_path).endswith("dinov2-small-random") and calls == [demo.PRETRAINED]
    assert demo.demo_backbone(tmp_path, prefer_pretrained=False).endswith("dinov2-small-random")
    monkeypatch.setattr(demo, "snapshot_download", lambda repo, **kw: calls.append("ok"))
    assert demo.demo_backbone(tmp_path) == demo.PRETRAINED
    monkeypatch.setattr(demo, "cached_checkpoint", lambda repo: tmp_path)
    monkeypatch.setattr(demo, "hub_unreachable", lambda: pytest.fail("asked the hub for a cached checkpoint"))
    assert demo.demo_backbone(tmp_path) == demo.PRETRAINED
    err = capsys.readouterr().err
    for why in ("HF_HUB_OFFLINE is set", "no connection", "Network is unreachable", "--random-backbone",
                "downloaded", "from the local Hugging Face cache"):
        assert why in err, err


@pytest.mark.slow
def test_an_interrupted_demo_runs_again(tmp_path, tiny_model, monkeypatch, rendered):
    """D19 of the second adversarial pass: Ctrl-C while rendering, then the same demo command."""
    import dcfeat.synthetic.photos as photos
    from dcfeat.demo import run_demo

    real, calls = photos._photo, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) > 30:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(photos, "_photo", interrupted)
    options = dict(streets=2, image_size=56, epochs=1, workers=0, progress=False, model=str(tiny_model), city=None)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "demo", **options)
    monkeypatch.setattr(photos, "_photo", real)
    result = run_demo(tmp_path / "demo", **options)
    fresh = rendered[1]
    assert {p.name for p in (tmp_path / "demo").iterdir()} >= {"images", "feats.h5"}
    for split, paths in fresh.items():
        assert sorted(p.name for p in (tmp_path / "demo" / "images" / split).iterdir()) == sorted(p.name for p in paths)
    assert result.report["queries"] == len(fresh["test"])


def test_an_incomplete_rendering_in_place_is_recognised(tmp_path):
    from dcfeat.synthetic.photos import is_incomplete_rendering

    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "@0550000.00@4180000.00@10@S@@@p000000@@0@@@@@@.jpg").write_bytes(b"")
    assert is_incomplete_rendering(tmp_path / "images")
    (tmp_path / "images" / "notes.txt").write_text("mine")
    assert not is_incomplete_rendering(tmp_path / "images")
