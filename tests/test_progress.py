"""Progress shows in logs: where stderr is not a terminal (nohup, a scheduler), plain lines with done/total,
rate and ETA replace the bar."""

import re

from dcfeat import progress
from tests.conftest import FAST_TRAIN, invoke


def test_plain_lines_say_done_total_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line at every step
    with progress.progress_bar("extract", 4, unit="img") as advance:
        advance(1)
        advance(3)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"extract: 1/4 img \(25 %\), [\d.,]+ img/s, elapsed 0:00:00, ETA \S+", lines[0]), lines
    assert lines[1].startswith("extract: 4/4 img (100 %)") and lines[1].endswith("ETA 0:00:00")
    assert lines[-1].endswith(", done")


def test_short_work_prints_nothing_and_disabled_progress_never(monkeypatch, capsys):
    with progress.progress_bar("extract", 4) as advance:
        advance(4)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with progress.progress_bar("extract", 4, enabled=False) as advance:
        advance(4)
    assert capsys.readouterr().err == ""


def test_training_under_a_log_shows_steps_and_epochs(city_store, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    args = [a for a in FAST_TRAIN if a != "--no-progress"]
    r = invoke("train", "--feats", city_store, "--out", tmp_path / "run", *args)
    assert r.exit_code == 0, r.output
    assert re.search(r"^epoch 1/6: 10/10 step \(100 %\), [\d.,]+ step/s", r.stderr, flags=re.M), r.stderr
    assert re.search(r"^epoch 6/6: loss [\d.]+, train accuracy [\d.]+ %, [\d.]+ s$", r.stderr, flags=re.M)
    assert not re.search(r"^epoch", r.stdout, flags=re.M)  # results on stdout, progress on stderr
