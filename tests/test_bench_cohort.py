"""benchmarks/bench_cohort.py on two tiny phantom scans with tiny untrained models: the three modes, their
tables, the equal-reports check, the single-scan run and bench_cohort.json."""
from __future__ import annotations

import contextlib
import json
import sys

import pytest

import analyze_scan
from benchmarks import bench_cohort as bench
from tests.helpers import TINY_SPACING, analysis_checkpoints
from utils.manifest import register


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for name, path in analysis_checkpoints(tmp_path_factory.mktemp("ckpts")).items():
        register(folder / "registered", name=name, ckpt=path)
    return folder / "registered"


def test_the_three_modes_give_equal_reports_tables_and_the_json(models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the analyses run in child processes
    out = tmp_path / "bench"
    argv = ["--models_dir", str(models_dir), "--out", str(out), "--n_scans", "2", "--shape", "64", "64", "24",
            "--spacing", *map(str, TINY_SPACING)]
    assert bench.main(bench.get_args_parser().parse_args(argv)) == 0
    printed = capsys.readouterr().out
    for mode, what in bench.MODES.items():
        assert f"| ({mode}) {what} |" in printed
    assert "reports of (b) against (a): equal within 1e-06 relative" in printed
    assert "reports of (c) against (a): equal within 1e-06 relative" in printed

    summary = json.loads((out / "bench_cohort.json").read_text())
    assert [r["mode"] for r in summary["modes"]] == ["a", "b", "c"] and summary["reports_equal"] is True
    assert summary["differences"] == {"a": [], "b": [], "c": []}
    assert [s["class"] for s in summary["scans"]] == ["Control", "CP"]
    for row in summary["modes"]:
        assert row["wall_s"] > 0 and row["scans_per_hour"] == pytest.approx(2 * 3600 / row["wall_s"])
        assert row["peak_rss_mb"] > 100 and row["peak_tree_pss_mb"] > 100  # the runtime alone takes more
    assert summary["modes"][0]["speed_up"] == 1.0
    for mode, stages in summary["stages"].items():  # every stage, (a)'s write step from its log
        assert list(stages) == [*bench.STAGES, "other"], mode
        assert stages["lungs"] > 0 and stages["write"] > 0
        wall = next(r["wall_s"] for r in summary["modes"] if r["mode"] == mode)
        assert sum(stages.values()) == pytest.approx(wall / 2)
    assert all((out / mode / "chest_2002" / "report.json").is_file() for mode in bench.MODES)
    assert (out / "b" / "cohort.csv").is_file() and (out / "c" / "cohort.csv").is_file()

    assert "single_scan" not in summary

    # the scans are cached: a second plan with the same settings writes nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "scans").glob("*.nii.gz")}
    plan = bench.scan_plan(2, 0)
    bench.make_scans(out / "scans", plan, shape=(64, 64, 24), spacing=TINY_SPACING)
    assert {p: p.stat().st_mtime_ns for p in (out / "scans").glob("*.nii.gz")} == before

    # a changed number is found, in report.json and in cohort.csv
    report = json.loads((out / "b" / "chest_2001" / "report.json").read_text())
    changed = json.loads(json.dumps(report))
    changed["quantities"]["left"]["lung_ml"] *= 1 + 1e-4
    changed["seconds"] = {}  # not compared
    assert bench.compare_reports(report, changed) == [
        f"quantities.left.lung_ml: {report['quantities']['left']['lung_ml']!r} vs "
        f"{changed['quantities']['left']['lung_ml']!r}"]
    changed["quantities"]["left"]["lung_ml"] = report["quantities"]["left"]["lung_ml"] * (1 + 1e-9)
    assert bench.compare_reports(report, changed) == []
    table = (out / "c" / "cohort.csv").read_text()
    value = f"{report['quantities']['total']['lung_ml']}"
    assert value in table
    (out / "c" / "cohort.csv").write_text(table.replace(value, str(float(value) * 1.01), 1))
    results = {mode: {"reports": {sid: str(out / mode / sid / "report.json") for sid in ("chest_2001", "chest_2002")}}
               for mode in bench.MODES}
    found = bench.check_equal(results, sorted((out / "scans").glob("*.nii.gz")))
    assert found["a"] == [] and found["b"] == [] and len(found["c"]) == 1
    assert found["c"][0].startswith("cohort.csv chest_2001: total.lung_ml: ")


def test_the_single_scan_alone(models_dir, tmp_path, monkeypatch, capsys):
    def in_this_process(command, log):  # analyze_scan.py without a child process (its start-up is slow)
        assert command[:2] == [sys.executable, str(bench.REPO / "analyze_scan.py")]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle, contextlib.redirect_stdout(handle):
            analyze_scan.main(analyze_scan.get_args_parser().parse_args(command[2:]))
        return {"wall_s": 30.0, "maxrss_mb": 1000.0, "tree_mb": 900.0}

    monkeypatch.setattr(bench, "run_process", in_this_process)
    out = tmp_path / "bench"
    argv = ["--models_dir", str(models_dir), "--out", str(out), "--shape", "64", "64", "24", "--spacing",
            *map(str, TINY_SPACING), "--modes", "--single_scan_slices", "16"]
    assert bench.main(bench.get_args_parser().parse_args(argv)) == 0
    summary = json.loads((out / "bench_cohort.json").read_text())
    assert "modes" not in summary and not (out / "scans").exists()
    single = summary["single_scan"]
    assert single["shape"] == [64, 64, 16] and single["wall_s"] == 30.0 and single["peak_rss_mb"] == 1000.0
    assert list(single["stages"]) == [*bench.STAGES, "other"] and single["stages"]["write"] > 0
    assert sum(single["stages"].values()) == pytest.approx(30.0)
    record = json.loads((out / "single_scan" / "scans" / "scans.json").read_text())
    assert list(record) == ["chest_2003_z16.nii.gz"] and record["chest_2003_z16.nii.gz"]["cls"] == 2  # COVID-19
    assert "single scan 64x64x16: 30.0 s, read " in capsys.readouterr().out


def test_step_times_are_read_from_the_report():
    report = {"seconds": {"reading the scan": 1.0, "lung segmentation": 2.0, "report": 12.5}}
    assert bench.stage_seconds(report) == {"read": 1.0, "lungs": 2.0, "write": 12.5}
