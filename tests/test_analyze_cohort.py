"""analyze_scan.py on a cohort: folder, list and dataset.json inputs, models loaded once, one folder per scan
equal to a one-scan run, cohort.csv, bad scans, resuming, shards and their merge, torchrun."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import analyze_scan
from datasets.conventions import LUNG_WINDOW, hu_to_png
from models.analysis import cohort, loading
from tests.helpers import analysis_checkpoints, analysis_flags, chest_phantom, write_dicom_series
from utils import cli

REPO = Path(__file__).resolve().parents[1]
NAMES = ("chest_a", "chest_b", "chest_c")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return analysis_checkpoints(tmp_path_factory.mktemp("models"))


def _write_scan(path: Path, *, seed: int) -> Path:
    volume = chest_phantom(seed=seed, orientation="LPS")
    nib.save(nib.Nifti1Image(volume["image"].astype(np.int16), volume["affine"]), path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """A folder of three tiny NIfTI scans."""
    folder = tmp_path_factory.mktemp("scans")
    for seed, name in enumerate(NAMES):
        _write_scan(folder / f"{name}.nii.gz", seed=seed)
    return folder


def _run(argv: list[str]):
    return analyze_scan.main(analyze_scan.get_args_parser().parse_args(argv))


def _table(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def one_process(scans, checkpoints, tmp_path_factory) -> Path:
    """The cohort run once in one process, with a count of the models loaded."""
    out = tmp_path_factory.mktemp("cohort") / "out"
    loads, real = [], loading._load
    patch = pytest.MonkeyPatch()
    patch.setattr(loading, "_load", lambda name, *a, **k: loads.append(name) or real(name, *a, **k))
    try:
        _run([str(scans), "--out", str(out), *analysis_flags(checkpoints)])
    finally:
        patch.undo()
    (out / "loads.json").write_text(json.dumps(loads))
    return out


def _assert_same_tables(a: list[dict], b: list[dict], *, tol: float = 1e-6) -> None:
    assert [list(r) for r in a] == [list(r) for r in b]
    for x, y in zip(a, b):
        for key in x:
            try:
                assert float(x[key]) == pytest.approx(float(y[key]), abs=tol), key
            except ValueError:
                assert x[key] == y[key], key


def test_a_folder_loads_the_models_once_and_each_scan_gets_a_one_scan_run(one_process, scans, checkpoints, tmp_path,
                                                                        capsys):
    assert json.loads((one_process / "loads.json").read_text()) == list(loading.MODELS)  # each model once
    single = tmp_path / "single"
    summary = _run([str(scans / "chest_b.nii.gz"), "--out", str(single), *analysis_flags(checkpoints)])
    assert "one scan" in capsys.readouterr().out
    folder = one_process / "chest_b"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in single.iterdir())
    report = json.loads((folder / "report.json").read_text())
    assert report["quantities"] == summary["quantities"]
    assert {k: v["probability"] for k, v in report["covid"].items()} == \
           {k: v["probability"] for k, v in summary["covid"].items()}
    assert all(Path(p).parent == folder and Path(p).is_file() for p in report["files"].values())
    assert not list(one_process.glob(".tmp-*"))
    rows = _table(one_process / "cohort.csv")
    assert [r["scan_id"] for r in rows] == list(NAMES) and {r["status"] for r in rows} == {"ok"}
    row = rows[1]
    assert row["input"] == str(scans / "chest_b.nii.gz") and row["error"] == "" and row["warnings"] == ""
    assert float(row["left.lung_ml"]) == pytest.approx(report["quantities"]["left"]["lung_ml"])
    total = report["quantities"]["total"]
    assert float(row["total.involvement_percent"]) == pytest.approx(total["involvement_percent"])
    for name in loading.CLASSIFIERS:
        assert float(row[f"{name}.probability"]) == pytest.approx(report["covid"][name]["probability"])
    assert [row[f"{m['name']}.sha256"] for m in report["models"]] == [m["sha256"] for m in summary["models"]]
    page = (one_process / "cohort.html").read_text()
    by_involvement = sorted(rows, key=lambda r: -float(r["total.involvement_percent"]))
    assert [page.index(f"href='{r['scan_id']}/report.html'") for r in by_involvement] == \
           sorted(page.index(f"href='{r['scan_id']}/report.html'") for r in rows)
    assert "src='chest_b/montage_lesions.png'" in page and (folder / "montage_lesions.png").is_file()
    for picture in ("cohort_involvement.png", "cohort_covid.png"):
        assert f"src='{picture}'" in page and (one_process / picture).stat().st_size > 1000


def test_a_bad_scan_is_an_error_row_and_the_others_go_on(scans, checkpoints, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "scans"
    shutil.copytree(scans, folder)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    monkeypatch.setattr(cli, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    argv = [str(folder), "--out", str(out), *analysis_flags(checkpoints), "--skip", *loading.CLASSIFIERS]
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(analyze_scan.main, analyze_scan.get_args_parser(), argv)
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "a folder of 4 scans" in captured.out
    assert "error: 3 of 4 scans ok, 1 failed (broken)" in captured.err
    rows = {r["scan_id"]: r for r in _table(out / "cohort.csv")}
    assert rows["broken"]["status"] == "error" and "broken.nii.gz" in rows["broken"]["error"]
    assert "\n" not in rows["broken"]["error"] and rows["broken"]["left.lung_ml"] == ""
    assert all(rows[name]["status"] == "ok" for name in NAMES)
    assert not (out / "broken").exists() and not (out / ".tmp-broken").exists()
    assert "Failed (1)" in (out / "cohort.html").read_text()


def test_a_rerun_skips_the_scans_done_and_redoes_a_leftover_temporary_folder(one_process, scans, checkpoints,
                                                                           tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(one_process, out)
    os.replace(out / "chest_c", out / ".tmp-chest_c")  # as a run killed while writing chest_c leaves it
    (out / ".tmp-chest_c" / "report.json").unlink()
    before = _table(out / "cohort.csv")
    (out / "cohort.csv").unlink()
    analysed, real = [], cohort.analyze
    monkeypatch.setattr(cohort, "analyze",
                        lambda scan, *a, **k: analysed.append(Path(scan.source).name) or real(scan, *a, **k))
    _run([str(scans), "--out", str(out), *analysis_flags(checkpoints)])
    assert analysed == ["chest_c.nii.gz"]
    assert not (out / ".tmp-chest_c").exists() and (out / "chest_c" / "report.json").is_file()
    _assert_same_tables(_table(out / "cohort.csv"), before)
    analysed.clear()
    _run([str(scans), "--out", str(out), *analysis_flags(checkpoints), "--skip", "covid_cls"])  # other models
    assert analysed == [f"{name}.nii.gz" for name in NAMES]
    assert "covid_cls.probability" not in _table(out / "cohort.csv")[0]


def test_shards_are_disjoint_cover_the_cohort_and_merge_to_the_one_process_table(one_process, scans, checkpoints,
                                                                                tmp_path):
    found = cohort.find_scans(scans)
    for count in (2, 3, 5):
        parts = [[p for p in found.paths if cohort.shard_of(p, count) == i] for i in range(count)]
        assert sorted(p for part in parts for p in part) == found.paths
    assert cohort.shard_of("/data/x.nii.gz", 4) == cohort.shard_of("/data/x.nii.gz", 4)  # not Python's salted hash
    out = tmp_path / "out"
    for i in range(2):
        _run([str(scans), "--out", str(out), *analysis_flags(checkpoints), "--shard", f"{i}/2"])
    shard = out / "cohort-shard-1-of-2.csv"
    shard.rename(out / "away.csv")
    with pytest.raises(ValueError, match=r"shards \[1\] of 2 have no table yet \(cohort-shard-1-of-2.csv\)"):
        cohort.main(cohort.get_args_parser().parse_args(["merge", str(out)]))
    (out / "away.csv").rename(shard)
    cohort.main(cohort.get_args_parser().parse_args(["merge", str(out)]))
    assert (out / "cohort.csv").read_text() == (one_process / "cohort.csv").read_text()


def test_list_files_and_dataset_json_name_the_scans(scans, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    _write_scan(tmp_path / "sub" / "chest_a.nii.gz", seed=5)  # same name as one in scans/
    listed = [str(scans / "chest_b.nii.gz"), str(scans / "chest_a.nii.gz"), "sub/chest_a.nii.gz"]
    (tmp_path / "scans.txt").write_text("\n".join(["# cohort", *listed, ""]))
    (tmp_path / "scans.csv").write_text("patient,path\n" + "".join(f"p{i},{p}\n" for i, p in enumerate(listed)))
    datalist = {"training": [{"image": "sub/chest_a.nii.gz", "label": 1}],
                "testing": [str(scans / "chest_b.nii.gz"), {"image": str(scans / "chest_a.nii.gz")},
                            {"image": "sub/chest_a.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    expected = {scans / "chest_a.nii.gz": "chest_a", scans / "chest_b.nii.gz": "chest_b",
                tmp_path / "sub" / "chest_a.nii.gz": "chest_a-2"}
    if str(tmp_path / "sub") < str(scans):  # ids follow the sorted paths
        expected = {**expected, scans / "chest_a.nii.gz": "chest_a-2", tmp_path / "sub" / "chest_a.nii.gz": "chest_a"}
    for name, kind in (("scans.txt", "list"), ("scans.csv", "list"), ("dataset.json", "datalist")):
        found = cohort.find_scans(tmp_path / name)
        assert found.kind == kind and found.ids == expected and found.paths == sorted(expected, key=str)
    training = cohort.find_scans(tmp_path / "dataset.json", section="training")
    assert training.ids == {tmp_path / "sub" / "chest_a.nii.gz": "chest_a"}
    with pytest.raises(ValueError, match=r"dataset.json: no section 'validation' .*'testing', 'training'"):
        cohort.find_scans(tmp_path / "dataset.json", section="validation")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: lists no scan"):
        cohort.find_scans(tmp_path / "empty.txt")


def test_a_folder_of_dicom_files_or_slice_pictures_stays_one_scan(tmp_path):
    volume = chest_phantom(seed=1)
    series = write_dicom_series(tmp_path / "series", volume["image"][:, :, :4].astype(np.int16))
    slices = tmp_path / "slices"
    slices.mkdir()
    for z in range(3):
        Image.fromarray(hu_to_png(volume["image"][:, :, z].T, LUNG_WINDOW)).save(slices / f"NCP_5_1_{z:04d}.png")
    for folder in (series, slices):
        found = cohort.find_scans(folder)
        assert found.kind == "scan" and found.paths == [folder]
    _write_scan(tmp_path / "one.nii.gz", seed=0)
    found = cohort.find_scans(tmp_path, exclude=tmp_path / "out")  # NIfTI files and scan folders: a cohort
    assert found.kind == "folder" and found.ids == {tmp_path / "one.nii.gz": "one", series: "series", slices: "slices"}


def test_torchrun_two_processes_give_the_one_process_table(one_process, scans, checkpoints, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(scans, folder)
    _write_scan(folder / "chest_d.nii.gz", seed=3)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "analyze_scan.py"), str(folder), "--out", str(out), *analysis_flags(checkpoints)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("cohort-shard-*.csv")) == ["cohort-shard-0-of-2.csv",
                                                                       "cohort-shard-1-of-2.csv"]
    rows = _table(out / "cohort.csv")
    assert [r["scan_id"] for r in rows] == [*NAMES, "chest_d"] and {r["status"] for r in rows} == {"ok"}
    expected = _table(one_process / "cohort.csv")
    for row in rows[:3]:
        row["input"] = row["input"].replace(str(folder), str(scans))
    _assert_same_tables(rows[:3], expected)
    assert result.stdout.count("4 of 4 scans ok") == 1  # rank 0 alone reports the merged table


def test_a_run_killed_with_sigkill_is_finished_by_running_it_again(scans, checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "analyze_scan.py"), str(scans), "--out", str(out),
               *analysis_flags(checkpoints)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / ".tmp-chest_b").exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (out / "chest_a" / "report.json").is_file() and not (out / "chest_b").exists()
    analysed, real = [], cohort.analyze
    monkeypatch.setattr(cohort, "analyze",
                        lambda scan, *a, **k: analysed.append(Path(scan.source).name) or real(scan, *a, **k))
    rows = _run([str(scans), "--out", str(out), *analysis_flags(checkpoints)])
    assert analysed == ["chest_b.nii.gz", "chest_c.nii.gz"]
    assert [r["status"] for r in rows] == ["ok"] * 3 and not list(out.glob(".tmp-*"))


def test_worker_processes_read_ahead_and_give_the_same_table(scans, checkpoints, tmp_path, monkeypatch):
    folder = tmp_path / "scans"
    shutil.copytree(scans, folder)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
    volume = chest_phantom(seed=6)
    image = volume["image"].astype(np.float32)
    image.flat[::200] = np.nan
    nib.save(nib.Nifti1Image(image, volume["affine"]), folder / "holes.nii.gz")
    readers, real = tmp_path / "readers.txt", cohort.read_scan

    def read_scan(*a, **k):  # inherited by the forked reader processes
        with readers.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        return real(*a, **k)

    monkeypatch.setattr(cohort, "read_scan", read_scan)
    argv = [str(folder), *analysis_flags(checkpoints), "--skip", *loading.CLASSIFIERS, "--fill_nan", "-1000"]
    tables = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        with pytest.raises(cohort.CohortFailed, match="4 of 5 scans ok, 1 failed \\(broken\\)"):
            _run([*argv, "--out", str(out), "--workers", str(workers)])
        tables[workers] = _table(out / "cohort.csv")
        assert not list(out.glob(".tmp-*")) and (out / "holes" / "scan.nii.gz").is_file()
    pids = [int(line) for line in readers.read_text().split()]
    assert pids[:5] == [os.getpid()] * 5 and os.getpid() not in pids[5:] and len(pids) == 10
    _assert_same_tables(tables[2], tables[0], tol=0)
    holes = {r["scan_id"]: r for r in tables[2]}["holes"]
    assert holes["status"] == "ok" and holes["warnings"].startswith("NonFiniteWarning: ") and "-1000 HU" in \
        holes["warnings"]
