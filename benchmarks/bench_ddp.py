"""The trainers as 1 process against 2 DDP processes (gloo, CPU) under ``torchrun``: samples per second.

    python -m benchmarks.bench_ddp [--out runs/bench_ddp] [--image_size 128]

Writes a small phantom set (the GPU check's: a few patients of every kind) and runs every trainer
(``train_segmentation.py``, ``train_classifier.py``, ``train_volumetric.py`` for lung_seg, lesion_seg
and covid_cls) for one epoch over its whole training split, first as ``torchrun --nproc_per_node 1``
with ``--threads`` threads, then as 2 processes with half the threads each, so both use the same
cores. An epoch is the same samples either way (the DistributedSampler deals them out), so the
samples per second (over the wall time of the whole command: start-up, the epoch, rank 0's
validation) compare like with like; the 2D trainers' ``metrics.jsonl`` also give the epoch's own time.
It shows the overhead of DDP on one machine, not a speed-up: on 2 cores there is nothing to gain.
Correctness is in tests/test_ddp_2d.py and tests/test_volumetric_ddp.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check import cases, make_data

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_segmentation": "train_segmentation.py", "train_classifier": "train_classifier.py"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_ddp", help="data, runs and bench_ddp.md (default: runs/bench_ddp)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, split between the processes "
                                                          "(default: 2)")
    return p


def torchrun(script: str, argv: list[str], processes: int, threads: int) -> float:
    """Run ``script`` under torchrun as ``processes`` gloo CPU processes; returns the wall seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               script, *argv, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def without_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value."""
    if flag not in argv:
        return list(argv)
    at = argv.index(flag)
    return argv[:at] + argv[at + 2:]


def epoch_record(run: Path) -> dict:
    """The first line of the run's metrics.jsonl."""
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def run(args: argparse.Namespace) -> list[dict]:
    """Every trainer as 1 and as 2 processes; one row per run."""
    out = Path(args.out).resolve()
    data, runs = make_data(out, tiny=True), out / "runs"
    rows = []
    for name, module, argv in cases(data, runs, tiny=True):
        script = SCRIPTS.get(name, "train_volumetric.py")
        argv = without_flag(argv, "--max_steps")  # whole epochs
        for processes in (1, 2):
            flags = [a.format(amp=f"_{processes}p") for a in argv] + ["--overwrite"]
            if name == "train_classifier":  # on the single process's segmentation run
                flags = [a.replace("seg_2p", "seg_1p") for a in flags]
            wall = torchrun(script, flags, processes, args.threads)
            save_dir = Path(flags[flags.index("--save_dir") + 1])
            record = epoch_record(save_dir)
            rows.append({"trainer": name, "processes": processes, "wall_s": wall, "epoch_s": record.get("time_s")})
    return rows


def table(rows: list[dict], data_sizes: dict[str, int]) -> str:
    """Markdown: seconds and samples per second of each run, and the 2-process / 1-process ratio."""
    lines = ["| trainer | processes | samples | wall s | samples/s | 2p / 1p samples/s | epoch s (2D) |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["trainer"], r["processes"]): r for r in rows}
    for r in rows:
        samples = data_sizes[r["trainer"]]
        ratio = f"{by[(r['trainer'], 1)]['wall_s'] / r['wall_s']:.2f}" if r["processes"] == 2 else ""
        epoch = "" if r["epoch_s"] is None else f"{r['epoch_s']:.1f}"
        lines.append(f"| {r['trainer']} | {r['processes']} | {samples} | {r['wall_s']:.1f} | "
                     f"{samples / r['wall_s']:.2f} | {ratio} | {epoch} |")
    return "\n".join(lines)


def training_sizes(data: Path) -> dict[str, int]:
    """Training samples per trainer in the phantom set."""
    slices = {split: len(list((data / split / "train" / "imgs").glob("*.png"))) or
              len(list((data / split / "train").glob("*.png"))) for split in ("seg", "cls")}
    sizes = {"train_segmentation": slices["seg"], "train_classifier": slices["cls"]}
    for task, datalist in (("lung_seg", "lung"), ("lesion_seg", "lesion"), ("covid_cls", "covid")):
        listed = json.loads((data / "volumes" / f"dataset_{datalist}.json").read_text())
        sizes[f"train_volumetric {task}"] = len(listed["training"])
    return sizes


def main(args: argparse.Namespace) -> str:
    rows = run(args)
    text = table(rows, training_sizes(Path(args.out).resolve() / "data"))
    (Path(args.out) / "bench_ddp.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main(get_args_parser().parse_args())
