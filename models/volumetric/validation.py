"""Validation of a volumetric checkpoint on a labelled datalist section: what ``validate_volumetric.py`` runs.

The task's ``validate_cases`` stage scores each case on its own grid (Dice for the segmentation
tasks, per organ for organ_seg; accuracy, ROC AUC, sensitivity and specificity for covid_cls); the
rows go to ``predictions.csv`` and the summary to ``metrics.csv`` and ``metrics.json``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from models.volumetric.common import VALIDATION, load_cases
from models.volumetric.inference import load_task_model, write_rows
from utils.cli import resolve_device


def validate(*, task_name: str, ckpt: str | Path, datalist: str | Path, data_root: str | Path | None = None,
             section: str = VALIDATION, output: str | Path | None = None, ignore_empty: bool = False,
             save_masks: bool = False, amp: bool = False, device: str = "cpu") -> dict:
    """Validate a checkpoint on one section of a datalist and write the results.

    Args:
        task_name: the task the checkpoint must be for.
        ckpt: checkpoint from ``train_volumetric.py``.
        datalist, data_root, section: the labelled cases.
        output: folder for the results (default: ``<ckpt folder>/validate_<section>``).
        ignore_empty: exclude cases with empty ground truth from the mean Dice.
        save_masks: also write each predicted mask into ``output``.
        amp: mixed precision inside the network.
        device: torch device name.

    Returns:
        The summary (means and counts).
    """
    torch_device = resolve_device(device)
    model, task, config, _ = load_task_model(ckpt, device=torch_device, task_name=task_name)
    cases = load_cases(datalist, data_root=data_root, section=section)
    folder = Path(output) if output else Path(ckpt).parent / f"validate_{section}"
    rows, summary = task.validate_cases(cases, model=model, task=task, config=config, device=torch_device, amp=amp,
                                        ignore_empty=ignore_empty, mask_dir=folder if save_masks else None)
    write_results(folder, rows, summary)
    lines = task.validation_report(rows, summary)
    print("\n".join([*lines[:-1], f"{lines[-1]} -> {folder}"]))
    return summary


def write_results(folder: Path, rows: list[dict], summary: dict) -> None:
    """predictions.csv (per case), metrics.csv (metric,value) and metrics.json."""
    write_rows(folder / "predictions.csv", rows, default_columns=("case", "dice"))
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "value"])
        writer.writerows(summary.items())
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
