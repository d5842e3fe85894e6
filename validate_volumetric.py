"""Validate a volumetric checkpoint: per-case and mean Dice on each input's own grid (per organ for
organ_seg); for covid_cls accuracy, ROC AUC, sensitivity and specificity at the checkpoint's
threshold (0.5), with one row per case (case, label, probability) in predictions.csv.

Canonical command::

    python validate_volumetric.py --task lesion_seg --ckpt runs/lesion_seg/checkpoint_best.pth \\
        --datalist data/phantom/volumes/dataset_lesion.json --section validation

(``python make_synthetic_data.py --out data/phantom`` writes the phantom's datalists to
``data/phantom/volumes/``: ``dataset_lung.json``, ``dataset_lesion.json``, ``dataset_covid.json``; their
paths are relative to that folder, the default ``--data_root``.)

Each case is pre-processed and segmented as in infer_volumetric.py, the mask is mapped back onto the
image's grid and compared with the label file there (any label value > 0 is foreground).

Empty ground truth: a case whose label has no foreground scores Dice 1.0 when the prediction is also
empty and 0.0 otherwise; with --ignore_empty such cases are excluded from the mean instead.

Writes to --output: ``predictions.csv`` (one row per case: case, image, label, prediction, dice,
label_voxels, predicted_voxels), ``metrics.csv`` (metric,value) and ``metrics.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from models.volumetric import task_names, task_stage
from models.volumetric.common import load_cases
from models.volumetric.inference import load_task_model, validate_cases
from utils.cli import add_device_args, resolve_device, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=task_names(), help="task the checkpoint was trained for (required)")
    parser.add_argument("--ckpt", required=True, help="checkpoint from train_volumetric.py (required)")
    parser.add_argument("--datalist", required=True, help="dataset.json listing image and label files (required)")
    parser.add_argument("--data_root", default=None, help="folder the datalist paths are relative to (default: the datalist's folder)")
    parser.add_argument("--section", default="validation", help="datalist section to validate (default: validation)")
    parser.add_argument("--output", default=None, help="folder for metrics.csv, metrics.json, predictions.csv (default: <ckpt folder>/validate_<section>)")
    parser.add_argument("--ignore_empty", action="store_true",
                        help="exclude cases with empty ground truth from the mean (default: off, they score 1.0 when the prediction is empty too, else 0.0)")
    parser.add_argument("--save_masks", action="store_true", help="also write each predicted mask as NIfTI in --output (default: off)")
    parser.add_argument("--amp", action="store_true", help="mixed precision inside the network (default: off)")
    add_device_args(parser)
    return parser


def write_results(folder: Path, rows: list[dict], summary: dict) -> None:
    """predictions.csv (per case), metrics.csv (metric,value) and metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["case", "dice"])
        writer.writeheader()
        writer.writerows(rows)
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "value"])
        writer.writerows(summary.items())
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(args: argparse.Namespace) -> dict:
    """Validate; returns the summary (mean Dice and counts)."""
    device = resolve_device(args.device)
    model, task, config, _ = load_task_model(args.ckpt, device=device, task_name=args.task)
    cases = load_cases(args.datalist, data_root=args.data_root, section=args.section)
    output = Path(args.output) if args.output else Path(args.ckpt).parent / f"validate_{args.section}"
    validate = task_stage(task, "validate_cases", validate_cases)  # per-organ Dice, classification metrics
    rows, summary = validate(cases, model=model, task=task, config=config, device=device, amp=args.amp,
                             ignore_empty=args.ignore_empty, mask_dir=output if args.save_masks else None)
    write_results(output, rows, summary)
    if task.kind == "classification":
        print(", ".join(f"{k} {summary[k]:.4f}" for k in ("accuracy", "auc", "sensitivity", "specificity"))
              + f" over {summary['cases']} cases -> {output}")
        return summary
    for row in rows:
        print(f"{row['case']}: dice {row['dice']:.4f}")
    print(f"mean dice {summary['mean_dice']:.4f} over {summary['cases']} cases -> {output}")
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
