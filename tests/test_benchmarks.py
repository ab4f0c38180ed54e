"""The benchmark package's records and commands (pipelines/benchmarks); nothing long is measured here."""

import json

import pytest
from click.testing import CliRunner

from pipelines.benchmarks import BENCHMARKS, records
from pipelines.benchmarks.__main__ import main, record_run
from pipelines.benchmarks.render import render_all
from tests.conftest import ROOT


def test_a_run_is_recorded_by_date_device_and_commit_and_the_latest_renders(tmp_path, monkeypatch):
    import pipelines.benchmarks.cli as cli

    monkeypatch.setattr(cli, "measure", lambda runs: {"runs": runs, "median_s": dict.fromkeys(cli.COMMANDS, 0.5),
                                                     "help_over_torch": 1.0, "version_over_torch": 1.0})
    first, second = (record_run("cli", tmp_path, {"runs": n}) for n in (1, 2))
    date, device = first.name.split(".")[1:3]
    assert first.name == f"cli.{date}.{device}.1.json" and second.name == f"cli.{date}.{device}.2.json"
    record = json.loads(second.read_text())
    assert record["commit"].split("+")[0] and record["device"].endswith("cores") and set(record["load"]) == {"before", "after"}
    assert [r["runs"] for r in records.records("cli", tmp_path)] == [1, 2]
    assert "median of 2 fresh processes" in cli.render(records.records("cli", tmp_path))


def test_rows_are_recorded_as_they_come_and_read_back_under_the_header(tmp_path, monkeypatch):
    import pipelines.benchmarks.sweep as sweep

    def rows_then_fail(rows, **options):
        rows({"s": 30.0})
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "measure", rows_then_fail)
    try:
        record_run("sweep", tmp_path, {})
    except KeyboardInterrupt:
        pass
    (record,) = records.records("sweep", tmp_path)
    assert record["rows"] == [{"s": 30.0}] and "date" in record and "commit" in record


def test_the_recorded_results_render_every_section():
    text = render_all({name: __import__(f"pipelines.benchmarks.{name}", fromlist=["render"]).render
                       for name in BENCHMARKS})
    assert "Not measured yet" not in text and "no sweep recorded" not in text and "No GPU run" not in text
    assert text.splitlines()[:3] == (ROOT / "BENCHMARKS.md").read_text().splitlines()[:3]
    # The first H100 run is marked superseded: only its correctness check is shown.
    assert "NVIDIA H100 80GB HBM3, 16 CPU cores, torch 2.11.0+cu130, Python 3.12.3 (1 run(s)" in text
    assert "NVIDIA H200, 16 CPU cores, torch 2.11.0+cu130, Python 3.12.3 (2 run(s)" in text
    assert "Correctness on the GPU (first run)" in text


def test_unknown_cities_are_refused_naming_the_option():
    r = CliRunner().invoke(main, ["run", "worlds", "--cities", "grid,atlantis"])
    assert r.exit_code == 2 and "--cities" in r.output and "atlantis" in r.output


@pytest.mark.slow
def test_scale_records_each_size_the_memory_check_and_faiss_and_draws_its_figure(tmp_path):
    path = record_run("scale", tmp_path, {"sizes": [3000], "queries": 50, "memory_check_at": 3000,
                                          "faiss_at": 3000})
    (record,) = records.records("scale", tmp_path)
    (large,) = record["sizes"]
    assert large["rows"] == 3000 and large["classes"] == 3000 // 20
    for s in (large,):
        assert 80 <= s["candidates_per_query"] <= 120  # 5 cells of ~20 rows
        assert s["found_own_photo"] == 1.0  # each query's photo is its nearest candidate
        assert all(s[f"{p}_{c}_ms"] > 0 for p in ("search", "fused_1", "fused_20") for c in ("warm", "cold"))
        assert s["end"]["VmHWM"] >= s["after_open"]["VmHWM"] > 0
    assert large["memory"]["identical_rows"] and large["memory"]["identical_scores"]
    f = large["faiss"]
    assert f["recall_at_1"] >= large["cell_recall_at_1"] == 1.0 and f["nprobe"] == f["sweep"][-1]["nprobe"]
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from pipelines.benchmarks import scale

    text = scale.render(records.records("scale", tmp_path))
    assert "| 3,000 |" in text and "rows and scores identical" in text and f"nprobe {f['nprobe']}" in text


def test_scale_refuses_a_check_at_a_size_it_does_not_build():
    r = CliRunner().invoke(main, ["run", "scale", "--sizes", "2000", "--faiss-at", "3000"])
    assert r.exit_code == 2 and "--faiss-at" in r.output and "3000" in r.output


def test_the_suite_benchmark_counts_the_cpu_of_every_process_a_step_waits_for(tmp_path):
    import os
    import sys

    from pipelines.benchmarks import suite

    (tmp_path / "busy.py").write_text("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n"
                                      "    pass\n")
    step = suite._cpu_of(["sh", "-c", f"{sys.executable} busy.py; echo done"], tmp_path, dict(os.environ))
    assert step["cpu_s"] >= 0.3 and step["cpu_s"] == pytest.approx(step["user_s"] + step["sys_s"])
    assert step["output"] == "done\n"  # the grandchild's CPU is the step's
    with pytest.raises(SystemExit, match="(?s)exit 3.*oops"):
        suite._cpu_of(["sh", "-c", "echo oops; exit 3"], tmp_path, dict(os.environ))
    assert suite._outcome("...\n944 passed, 6 skipped in 100.36s (0:01:40)\n") == "944 passed, 6 skipped"
    assert suite._outcome("===== 2 failed, 10 passed in 3.20s =====") == "2 failed, 10 passed"


def test_the_suite_benchmark_refuses_a_commit_it_cannot_find():
    r = CliRunner().invoke(main, ["run", "suite", "--baseline", "no-such-commit", "--runs", "1"])
    assert r.exit_code == 2 and "--baseline" in r.output and "'no-such-commit' is no commit" in r.output
