"""analyze_scan.py on clinical-size phantom scans: one process per scan against one cohort run.

    python -m benchmarks.bench_cohort --models_dir runs/demo/models [--out runs/bench_cohort] [--n_scans 8]
        [--shape 512 512 120] [--spacing 0.7 0.7 2.5] [--seed 0] [--modes a b c] [--single_scan_slices 300]

Writes ``--n_scans`` phantom chest scans (``datasets.synthetic``; Control, CP and COVID-19 in turn,
RAS and LPS voxel order in turn, patients drawn from ``--seed``) into ``OUT/scans``, where a rerun
with the same settings finds them, and analyses them with the models of ``--models_dir`` (a folder
with manifest.json, as ``make demo`` writes to ``runs/demo/models``) in up to three ways, each into
its own folder (emptied first, since a cohort run skips scans already analysed):

    a  ``OUT/a/<id>``: one ``analyze_scan.py SCAN`` process per scan, one after the other;
    b  ``OUT/b``: one ``analyze_scan.py OUT/scans`` cohort run, ``--workers 0``;
    c  ``OUT/c``: the same with ``--workers 2`` (two processes read the next scans).

It prints two tables and writes them, with the settings, to ``OUT/bench_cohort.json``:

- per mode: wall seconds (for (a), from the first process's start to the last one's end), scans per hour,
  the speed-up over (a), the peak RSS of one process (``ru_maxrss`` from ``os.wait4``: for (a) the
  largest of the N processes; for (b) and (c) the larger of the cohort process and its reader
  processes, which the kernel folds into it) and the peak of the whole process tree's memory
  (proportional set sizes, PSS, of the process and its children summed, sampled every 0.5 s);
- per mode, the mean seconds per scan of each stage, from each ``report.json``'s ``seconds``
  (read, lungs, lesions, 3D classifier, 2D classifier, write: the report pictures and page), and
  ``other``: wall seconds per scan less those stages (start-up, imports, loading the models, writing
  the masks, the quantities). A one-scan ``report.json`` is written before its report step ends,
  so for (a) the write seconds come from that process's log, which prints each step's time. A
  one-scan run loads each model when its step first needs it, so (a)'s lungs, lesions and
  classifier seconds include loading that model; a cohort loads them all before its first scan
  (in ``other``).

Every mode's reports are compared with (a)'s: every number of ``report.json`` (quantities, grid,
probabilities, per-slice probabilities; not the seconds or the output paths) within 1e-6 relative,
everything else equal, and each row of a cohort's ``cohort.csv`` against the row (a)'s report gives.
The result is printed; the exit status is 1 when they differ.

``--single_scan_slices Z`` also analyses one scan of ``X x Y x Z`` (the first COVID-19 patient) in
one process and reports its time by stage and its peak memory; ``--modes`` with no mode runs it alone.

Logs: ``OUT/logs``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_quality import machine
from datasets.synthetic import make_chest_volume
from datasets.synthetic.volume_writers import save_nifti
from datasets.synthetic.writers import patient_classes, patient_seed
from models.analysis.cohort import COHORT_CSV, report_row

REPO = Path(__file__).resolve().parents[1]
MODES = {"a": "one process per scan", "b": "cohort, --workers 0", "c": "cohort, --workers 2"}
WORKERS = {"b": 0, "c": 2}
CLASS_NAMES = ("Control", "CP", "COVID-19")
# stage -> the step's name in report.json's "seconds" (models/analysis/pipeline.py)
STAGES = {"read": "reading the scan", "lungs": "lung segmentation", "lesions": "lesion segmentation",
          "3D classifier": "3D COVID-19 classifier", "2D classifier": "2D COVID-CT-Mask-Net classifier",
          "write": "report"}
NOT_COMPARED = ("seconds", "files")  # report.json keys that differ between runs by nature
PATH_KEYS = ("saliency", "overlay")  # output files named inside a classifier's result
RTOL = 1e-6
SAMPLE_S = 0.5


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models_dir", required=True, help="folder with manifest.json, passed to every run (required)")
    p.add_argument("--out", default="runs/bench_cohort",
                   help="scans/, a/, b/, c/, logs/ and bench_cohort.json (default: runs/bench_cohort)")
    p.add_argument("--n_scans", type=int, default=8, help="phantom scans in the cohort (default: 8)")
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 120), metavar=("X", "Y", "Z"),
                   help="voxels of each scan (default: 512 512 120)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 2.5), metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm (default: 0.7 0.7 2.5)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    p.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES),
                   help="a: one process per scan, b: cohort --workers 0, c: cohort --workers 2 (default: all; "
                        "none given: only --single_scan_slices)")
    p.add_argument("--single_scan_slices", type=int, default=0, metavar="Z",
                   help="also analyse one X x Y x Z scan alone and report its stages and peak memory (default: 0, "
                        "not run)")
    return p


# ----------------------------------------------------------------------------------------------- scans


def scan_plan(n: int, seed: int) -> list[dict]:
    """The phantom patients of the cohort: name, class and patient seed (the phantom set's numbering)."""
    return [{"name": f"chest_{pid}", "cls": cls, "pseed": patient_seed(seed, pid), "orientation": ("RAS", "LPS")[i % 2]}
            for i, (pid, cls) in enumerate(patient_classes("volumes", n, seed).items())]


def make_scans(folder: Path, plan: list[dict], *, shape, spacing) -> list[Path]:
    """Write the plan's scans as int16 NIfTI into ``folder``; those written before with the same settings are kept.

    ``folder/scans.json`` records the settings of each file; a file is written under a dot name (which a
    cohort run does not list) and renamed when complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "scans.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    paths = []
    for entry in plan:
        path = folder / f"{entry['name']}.nii.gz"
        settings = {**entry, "shape": list(shape), "spacing": list(spacing)}
        if record.get(path.name) != settings or not path.is_file():
            start = time.perf_counter()
            volume = make_chest_volume(seed=entry["pseed"], shape=tuple(shape), spacing=tuple(spacing),
                                       cls=entry["cls"], orientation=entry["orientation"])
            tmp = folder / f".tmp-{path.name}"
            save_nifti(tmp, volume["image"], volume["affine"])
            os.replace(tmp, path)
            record[path.name] = settings
            record_path.write_text(json.dumps(record, indent=1) + "\n")
            print(f"wrote {path} ({CLASS_NAMES[entry['cls']]}, {'x'.join(map(str, shape))}) in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    """The live descendants of ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _memory_kb(pid: int) -> int:
    """Proportional set size of ``pid`` in kB (its RSS where smaps_rollup is missing); 0 once it is gone."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except OSError:
            continue
    return 0


class TreeSampler(threading.Thread):
    """Samples the summed PSS of a process and its descendants every :data:`SAMPLE_S` s; keeps the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stopped = pid, 0, threading.Event()

    def run(self):
        while not self.stopped.is_set():
            total = sum(_memory_kb(p) for p in [self.pid, *_children(self.pid)])
            self.peak_kb = max(self.peak_kb, total)
            self.stopped.wait(SAMPLE_S)


def run_process(command: list[str], log: Path) -> dict:
    """Run ``command`` in the repository with its output in ``log``.

    Returns:
        ``wall_s``, ``maxrss_mb`` (``ru_maxrss`` of the process and its reaped children, the largest
        one) and ``tree_mb`` (sampled peak of the summed PSS of the process tree).

    Raises:
        RuntimeError: with the log's end when the command fails.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        sampler = TreeSampler(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        sampler.stopped.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({process.returncode}):\n"
                           f"{log.read_text()[-3000:]}")
    return {"wall_s": wall, "maxrss_mb": usage.ru_maxrss / 1024, "tree_mb": sampler.peak_kb / 1024}


def analyze_command(source: Path, out: Path, models_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "analyze_scan.py"), str(source), "--out", str(out),
            "--models_dir", str(models_dir), *extra]


def run_mode(mode: str, scans: list[Path], *, models_dir: Path, out: Path) -> dict:
    """Analyse ``scans`` (all in one folder) the way of ``mode`` into ``out/<mode>``, emptied first.

    Returns:
        ``mode``, ``wall_s``, ``maxrss_mb``, ``tree_mb`` and ``reports`` (scan id -> report.json path).
    """
    folder, logs = out / mode, out / "logs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ids = [path.name.removesuffix(".nii.gz") for path in scans]
    print(f"mode {mode} ({MODES[mode]}): {len(scans)} scans ...", flush=True)
    start = time.perf_counter()
    if mode == "a":
        runs = [run_process(analyze_command(path, folder / sid, models_dir), logs / f"a-{sid}.log")
                for path, sid in zip(scans, ids)]
        result = {"maxrss_mb": max(r["maxrss_mb"] for r in runs), "tree_mb": max(r["tree_mb"] for r in runs)}
    else:
        result = run_process(analyze_command(scans[0].parent, folder, models_dir, "--workers", str(WORKERS[mode])),
                             logs / f"{mode}.log")
    result.update(mode=mode, wall_s=time.perf_counter() - start, load_average=os.getloadavg(),
                  reports={sid: str(folder / sid / "report.json") for sid in ids})
    print(f"mode {mode}: {result['wall_s']:.1f} s", flush=True)
    return result


# ---------------------------------------------------------------------------------------- stages


def stage_seconds(report: dict) -> dict[str, float]:
    """Seconds of each stage of one scan, from its report's ``seconds``."""
    seconds = report.get("seconds", {})
    return {stage: float(seconds[step]) for stage, step in STAGES.items() if step in seconds}


def mode_stages(result: dict) -> dict[str, float]:
    """Mean seconds per scan of each stage over the mode's scans, and ``other``: wall per scan less the stages."""
    per_scan = []
    for sid, path in result["reports"].items():
        report = json.loads(Path(path).read_text())
        per_scan.append(stage_seconds(report))
    means = {stage: float(np.mean([s[stage] for s in per_scan])) for stage in STAGES
             if all(stage in s for s in per_scan)}
    means["other"] = result["wall_s"] / len(per_scan) - sum(means.values())
    return means


# ------------------------------------------------------------------------------------------ checks


def report_values(report: dict) -> dict[str, object]:
    """The leaves of a report.json as ``dotted.key`` -> value, less what differs between runs by nature
    (the seconds, the paths of the output files)."""
    flat = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                if not (key == "" and k in NOT_COMPARED) and k not in PATH_KEYS:
                    walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = value

    walk(report, "")
    return flat


def _same(a, b, rtol: float) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)
    return a == b


def compare_reports(reference: dict, other: dict, *, rtol: float = RTOL) -> list[str]:
    """What differs between two report.json dicts (numbers beyond ``rtol`` relative; other values at all)."""
    a, b = report_values(reference), report_values(other)
    differences = [f"{k}: only in {'the reference' if k in a else 'the other'}" for k in sorted(set(a) ^ set(b))]
    differences += [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if k in b and not _same(a[k], b[k], rtol)]
    return differences


def compare_row(expected: dict, row: dict, *, rtol: float = RTOL) -> list[str]:
    """What differs between a cohort.csv row (strings) and the row :func:`report_row` gives (values)."""
    differences = [f"{k}: missing from the table" for k in expected if k not in row]
    differences += [f"{k}: not expected in the table" for k in row if k not in expected]
    for key, value in expected.items():
        if key not in row:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                same = math.isclose(float(row[key]), value, rel_tol=rtol, abs_tol=1e-12)
            except ValueError:
                same = False
        else:
            same = row[key] == ("" if value is None else str(value))
        if not same:
            differences.append(f"{key}: {value!r} vs {row[key]!r}")
    return differences


def check_equal(results: dict[str, dict], scans: list[Path], *, rtol: float = RTOL) -> dict[str, list[str]]:
    """Each mode's reports (and cohort.csv rows) against mode a's (or the first mode's); mode -> differences."""
    base = "a" if "a" in results else next(iter(results))
    reference = {sid: json.loads(Path(p).read_text()) for sid, p in results[base]["reports"].items()}
    paths = {path.name.removesuffix(".nii.gz"): path for path in scans}
    found = {}
    for mode, result in results.items():
        differences = []
        for sid, path in result["reports"].items():
            if mode != base:
                report = json.loads(Path(path).read_text())
                differences += [f"{sid}: {d}" for d in compare_reports(reference[sid], report, rtol=rtol)]
        table = Path(result["reports"][next(iter(result["reports"]))]).parents[1] / COHORT_CSV
        if table.is_file():
            with table.open(newline="") as handle:
                rows = {row["scan_id"]: row for row in csv.DictReader(handle)}
            for sid, report in reference.items():
                expected = report_row(report, path=paths[sid], scan_id=sid)
                if sid not in rows:
                    differences.append(f"{COHORT_CSV}: no row {sid}")
                else:
                    differences += [f"{COHORT_CSV} {sid}: {d}" for d in compare_row(expected, rows[sid], rtol=rtol)]
        found[mode] = differences
    return found


# ------------------------------------------------------------------------------------------ tables


def mode_rows(results: dict[str, dict], n_scans: int) -> list[dict]:
    """One row per mode: wall s, scans per hour, speed-up over mode a, peak RSS and tree memory (MB)."""
    base = results.get("a")
    return [{"mode": mode, "what": MODES[mode], "wall_s": r["wall_s"], "scans_per_hour": n_scans * 3600 / r["wall_s"],
             "speed_up": base["wall_s"] / r["wall_s"] if base else None, "peak_rss_mb": r["maxrss_mb"],
             "peak_tree_pss_mb": r["tree_mb"], "load_average_after": r["load_average"]} for mode, r in results.items()]


def mode_table(rows: list[dict]) -> str:
    lines = ["| mode | wall s | scans/hour | speed-up vs (a) | peak RSS MB (one process) | "
             "peak PSS MB (process tree) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speed = "" if r["speed_up"] is None else f"{r['speed_up']:.2f}x"
        lines.append(f"| ({r['mode']}) {r['what']} | {r['wall_s']:.1f} | {r['scans_per_hour']:.1f} | {speed} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_tree_pss_mb']:.0f} |")
    return "\n".join(lines)


def stage_table(stages: dict[str, dict[str, float]]) -> str:
    columns = [*STAGES, "other"]
    lines = ["| mode | " + " | ".join(columns) + " | wall per scan |", "|---" * (len(columns) + 2) + "|"]
    for mode, means in stages.items():
        cells = [f"{means[c]:.1f}" if c in means else "" for c in columns]
        total = sum(means[c] for c in columns if c in means)
        lines.append(f"| ({mode}) | " + " | ".join(cells) + f" | {total:.1f} |")
    return "\n".join(lines)


def single_scan(args: argparse.Namespace, out: Path, models_dir: Path) -> dict:
    """One X x Y x ``--single_scan_slices`` scan analysed alone: wall s, stages, peak memory."""
    shape = (*args.shape[:2], args.single_scan_slices)
    plan = scan_plan(max(args.n_scans, 3), args.seed)
    entry = next(e for e in plan if e["cls"] == 2)
    entry = {**entry, "name": f"{entry['name']}_z{shape[2]}"}
    path, = make_scans(out / "single_scan" / "scans", [entry], shape=shape, spacing=args.spacing)
    folder = out / "single_scan" / "out"
    shutil.rmtree(folder, ignore_errors=True)
    print(f"single scan {path.name} ({'x'.join(map(str, shape))}) ...", flush=True)
    log = out / "logs" / f"single-{path.name.removesuffix('.nii.gz')}.log"
    run = run_process(analyze_command(path, folder, models_dir), log)
    report = json.loads((folder / "report.json").read_text())
    stages = stage_seconds(report)
    stages["other"] = run["wall_s"] - sum(stages.values())
    return {"scan": str(path), "shape": list(shape), "spacing": list(args.spacing), "wall_s": run["wall_s"],
            "stages": stages, "peak_rss_mb": run["maxrss_mb"], "peak_tree_pss_mb": run["tree_mb"]}


def main(args: argparse.Namespace) -> int:
    out, models_dir = Path(args.out).resolve(), Path(args.models_dir).resolve()
    if not (models_dir / "manifest.json").is_file():
        raise SystemExit(f"error: no manifest.json in {models_dir} (--models_dir)")
    if args.modes and args.n_scans < 1:
        raise SystemExit("error: --n_scans must be at least 1")
    summary = {"command": " ".join(sys.argv), "machine": machine(), "load_average_start": os.getloadavg(),
               "n_scans": args.n_scans, "shape": list(args.shape), "spacing": list(args.spacing), "seed": args.seed,
               "models_dir": str(models_dir), "date": time.strftime("%Y-%m-%d %H:%M")}
    code = 0
    out.mkdir(parents=True, exist_ok=True)
    if args.modes:
        plan = scan_plan(args.n_scans, args.seed)
        scans = make_scans(out / "scans", plan, shape=args.shape, spacing=args.spacing)
        summary["scans"] = [{"file": p.name, "class": CLASS_NAMES[e["cls"]]} for p, e in zip(scans, plan)]
        results = {mode: run_mode(mode, scans, models_dir=models_dir, out=out) for mode in MODES if mode in args.modes}
        rows = mode_rows(results, len(scans))
        stages = {mode: mode_stages(result) for mode, result in results.items()}
        differences = check_equal(results, scans)
        equal = not any(differences.values())
        print(mode_table(rows), "", "mean seconds per scan by stage:", stage_table(stages), "", sep="\n")
        base = "a" if "a" in results else next(iter(results))
        for mode, found in differences.items():
            if mode != base or found:
                print(f"reports of ({mode}) against ({base}): "
                      f"{'equal within %g relative' % RTOL if not found else f'{len(found)} differences'}")
                for line in found[:20]:
                    print(f"  {line}")
        summary.update(modes=rows, stages=stages, reports_equal=equal, differences=differences,
                       rtol=RTOL, reference_mode=base)
        code = 0 if equal else 1
    if args.single_scan_slices:
        summary["single_scan"] = one = single_scan(args, out, models_dir)
        print(f"single scan {'x'.join(map(str, one['shape']))}: {one['wall_s']:.1f} s, "
              + ", ".join(f"{k} {v:.1f}" for k, v in one["stages"].items())
              + f"; peak RSS {one['peak_rss_mb']:.0f} MB, process tree {one['peak_tree_pss_mb']:.0f} MB PSS")
    summary["load_average_end"] = os.getloadavg()
    (out / "bench_cohort.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"written: {out / 'bench_cohort.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
