"""Every trainer for a few steps with and without ``--amp``, then ``analyze_scan.py``: time and peak GPU memory.

    bash benchmarks/gpu_check.sh                       # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --out runs/gpu_check [--device cuda] [--tiny]

Writes a small phantom set (clinical-size 512-px slices and default chest volumes; ``--tiny``: 64-px
slices and small volumes, for a dry run on CPU) under ``OUT/data``, then runs, each in this process
through its script's parser and ``main``:

- ``train_segmentation.py`` (ResNet18-t2, batch 2) and ``train_classifier.py`` on it, a few steps;
- ``train_volumetric.py`` for lung_seg, lesion_seg and covid_cls, one epoch;

each without and with ``--amp`` (bfloat16 where the GPU has it, else float16 with a loss scaler), and
finally ``analyze_scan.py`` on a test scan with the models trained with ``--amp``, also both ways. Prints a
markdown table (step, precision, seconds, peak GPU memory from ``torch.cuda.max_memory_allocated``) and
writes it to ``OUT/gpu_check.md`` with the GPU's name. Times include each script's start (model
building, data loading), so they compare settings, not kernels.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import analyze_scan
import make_synthetic_data
import train_classifier
import train_segmentation
import train_volumetric
from utils.amp import precision
from utils.cli import resolve_device

STEPS = "3"  # batches per 2D epoch


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="data, runs and gpu_check.md (default: runs/gpu_check)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="64-px slices and small volumes (a CPU dry run) (default: off)")
    return p


def make_data(out: Path, tiny: bool) -> Path:
    """A few phantom patients of every kind; returns the data folder."""
    data = out / "data"
    size = ["--image_size", "64", "--volume_shape", "48", "48", "16"] if tiny else []
    make_synthetic_data.main(make_synthetic_data.get_args_parser().parse_args(
        ["--out", str(data), "--seed", "0", "--n_patients", "6", "--n_seg_patients", "6", "--slices_per_patient", "2",
         "--n_volumes", "6", "--volume_splits", "0.5", "0.17", "0.33", "--outputs", "seg", "cls", "volumes",
         "--no_montage", *size]))
    return data


def cases(data: Path, runs: Path, tiny: bool) -> list[tuple[str, object, list[str]]]:
    """(name, script module, argv) of every trainer, in order; ``{amp}`` marks the run folders' suffix."""
    size = "64" if tiny else "512"
    volumes = data / "volumes"
    seg = ["--backbone_name", "resnet18", "--truncation", "2", "--mask_type", "both", "--num_epochs", "1",
           "--max_steps", STEPS, "--batch_size", "2", "--image_size", size, "--lrate", "1e-3", "--no_progress",
           "--train_data_dir", str(data / "seg" / "train"), "--val_data_dir", str(data / "seg" / "val")]
    cls = ["--num_epochs", "1", "--max_steps", STEPS, "--batch_size", "2", "--image_size", size, "--lrate", "1e-3",
           "--no_progress", "--train_data_dir", str(data / "cls" / "train"),
           "--val_data_dir", str(data / "cls" / "val")]
    roi = {"lung_seg": ["32", "32", "32"], "lesion_seg": ["32", "32", "16"], "covid_cls": ["32", "32", "32"]}
    out = [("train_segmentation", train_segmentation, seg + ["--save_dir", str(runs / "seg{amp}")]),
           ("train_classifier", train_classifier,
            cls + ["--pretrained_segmentation_model", str(runs / "seg{amp}" / "checkpoint_last.pth"),
                   "--save_dir", str(runs / "cls{amp}")])]
    for task, datalist in (("lung_seg", "lung"), ("lesion_seg", "lesion"), ("covid_cls", "covid")):
        out.append((f"train_volumetric {task}", train_volumetric,
                    ["--task", task, "--datalist", str(volumes / f"dataset_{datalist}.json"), "--epochs", "1",
                     "--batch_size", "2", "--no_progress", "--save_dir", str(runs / f"{task}{{amp}}"),
                     *(["--roi_size", *roi[task]] if tiny else [])]))
    return out


def timed(module, argv: list[str], device: torch.device) -> tuple[float, float | None]:
    """Run ``module.main`` on ``argv``; returns (seconds, peak GPU MiB or None on CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    module.main(module.get_args_parser().parse_args(argv))
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None


def run(args: argparse.Namespace) -> list[dict]:
    """Every case without and with ``--amp``, then analyze_scan; returns the table's rows."""
    device = resolve_device(args.device)
    out = Path(args.out)
    data, runs = make_data(out, args.tiny), out / "runs"
    rows = []
    for name, module, argv in cases(data, runs, args.tiny):
        for amp in (False, True):
            flags = [a.format(amp="_amp" if amp else "") for a in argv] + ["--device", args.device, "--overwrite"]
            seconds, peak = timed(module, flags + (["--amp"] if amp else []), device)
            rows.append({"step": name, "precision": precision(device, amp), "seconds": seconds, "peak_mib": peak})
    scan = json.loads((data / "volumes" / "dataset_covid.json").read_text())["test"][0]["image"]
    trained = (("lung_ckpt", "lung_seg"), ("lesion_ckpt", "lesion_seg"), ("covid3d_ckpt", "covid_cls"),
               ("covid2d_ckpt", "cls"))
    models = [a for flag, run in trained for a in (f"--{flag}", str(runs / f"{run}_amp" / "checkpoint_last.pth"))]
    for amp in (False, True):
        argv = [str(data / "volumes" / scan), "--out", str(out / f"analyze{'_amp' if amp else ''}"),
                *models, "--device", args.device] + (["--amp"] if amp else [])
        seconds, peak = timed(analyze_scan, argv, device)
        rows.append({"step": "analyze_scan", "precision": precision(device, amp), "seconds": seconds,
                     "peak_mib": peak})
    return rows


def table(rows: list[dict], device: torch.device) -> str:
    """Markdown: the device's name, then one row per step and precision."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    lines = [f"Device: {name}, torch {torch.__version__}", "", "| step | precision | seconds | peak GPU MiB |",
             "|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['step']} | {r['precision']} | {r['seconds']:.1f} | {peak} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> str:
    rows = run(args)
    text = table(rows, resolve_device(args.device))
    (Path(args.out) / "gpu_check.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main(get_args_parser().parse_args())
