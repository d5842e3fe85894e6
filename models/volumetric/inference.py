"""Inference with a volumetric checkpoint: checkpoint -> model, input -> cases, cases -> outputs.

:func:`infer` is what ``infer_volumetric.py`` runs: it reads a NIfTI file, a DICOM series or a
``dataset.json``, refuses outputs that would replace an input, and hands the cases to the task's
``infer_cases`` stage (masks and montages for the segmentation tasks, probabilities and saliency
maps for covid_cls), then writes ``predictions.csv``.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from datasets.volumes import PATH_KEYS
from models.volumetric import get_task
from models.volumetric.common import IMAGE_KEY, TEST, case_stem, load_cases
from models.volumetric.config import VolumeConfig
from models.volumetric.sliding_window import prepare_for_inference
from models.volumetric.task import Task
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint
from utils.cli import resolve_device
from utils.paths import refuse_overwriting_inputs

__all__ = ["infer", "input_cases", "load_task_model"]


def load_task_model(path: str | Path, *, device: torch.device, task_name: str | None = None
                    ) -> tuple[torch.nn.Module, Task, VolumeConfig, dict]:
    """Rebuild a volumetric model and its pre-processing settings from a checkpoint.

    Args:
        path: checkpoint written by ``train_volumetric.py``.
        device: target device; the model is returned in eval mode.
        task_name: the task the caller expects (None: take the checkpoint's).

    Raises:
        ValueError: when the checkpoint is not a volumetric one or belongs to another task.
    """
    ckpt = load_checkpoint(path)
    stored = ckpt.get("task")
    if stored is None or "task_config" not in ckpt:
        raise ValueError(f"{path}: not a volumetric checkpoint (no 'task'/'task_config' entries)")
    if task_name is not None and task_name != stored:
        raise ValueError(f"{path}: checkpoint is for task {stored!r}, not {task_name!r}")
    task = get_task(stored)
    config = type(task.default_config).from_dict(ckpt["task_config"])  # SegConfig or a task's own
    model = prepare_for_inference(build_model_from_checkpoint(ckpt), device=device)
    return model, task, config, ckpt


def input_cases(path: str | Path, *, data_root: str | Path | None = None, section: str = TEST) -> list[dict]:
    """Cases from a NIfTI file, a DICOM folder or file, or a ``dataset.json`` datalist (its ``section``).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.suffix == ".json":
        return load_cases(path, data_root=data_root, section=section)
    return [{IMAGE_KEY: str(path), "case": case_stem(path)}]


def infer(*, task_name: str, ckpt: str | Path, input_path: str | Path, output: str | Path,
          data_root: str | Path | None = None, section: str = TEST, window: dict | None = None,
          fill_nan: float | None = None, montage: bool = True, amp: bool = False, saliency: str | None = None,
          lung_ckpt: str | Path | None = None, device: str = "cpu") -> list[dict]:
    """Run a checkpoint on every input case and write its outputs and ``predictions.csv``.

    Args:
        task_name: the task the checkpoint must be for.
        ckpt: checkpoint from ``train_volumetric.py``.
        input_path: NIfTI file, DICOM folder/file or dataset.json (``--input``).
        output: folder for the outputs.
        data_root, section: dataset.json input: where its paths start, which section is read.
        window: sliding-window settings replacing the checkpoint's (``overlap``, ``sw_batch_size``,
            ``crop_region``, ``blend_mode``; None values keep the checkpoint's).
        fill_nan: HU value for NaN and infinite input voxels; None refuses such volumes.
        montage, amp, saliency: passed to the task's ``infer_cases``.
        lung_ckpt: lung_seg checkpoint for a task that segments the lungs of cases without a mask.
        device: torch device name.

    Returns:
        The predictions.csv rows.

    Raises:
        ValueError, FileNotFoundError: naming the input, case or flag that is wrong.
    """
    torch_device = resolve_device(device)
    cases = input_cases(input_path, data_root=data_root, section=section)
    if not cases:
        raise ValueError(f"--input {input_path}: no cases in section {section!r}")
    folder = Path(output)
    refuse_overwriting_inputs(input_files([input_path, ckpt, lung_ckpt], cases), output_files(cases, task_name, folder))
    model, task, config, _ = load_task_model(ckpt, device=torch_device, task_name=task_name)
    config = config.replace(**(window or {}), fill_nan=fill_nan)
    _check_fill_nan(task, config, fill_nan)
    if task.infer_cases is None:
        raise ValueError(f"task {task.name} has no inference output; use its checkpoint with train_volumetric.py")
    lung = (load_task_model(lung_ckpt, device=torch_device, task_name="lung_seg")[:3]
            if lung_ckpt and task.uses_lung_model else None)
    rows = task.infer_cases(cases, model=model, task=task, config=config, device=torch_device, output=folder,
                            amp=amp, montage=montage, saliency=saliency, lung_model=lung)
    write_rows(folder / "predictions.csv", rows)
    print(f"{len(rows)} case(s) -> {folder}")
    return rows


def input_files(paths: list, cases: list[dict]) -> list[str]:
    """Every file the run reads: ``paths`` (input, checkpoints; None skipped) and each case's volumes."""
    files = [str(p) for p in paths if p is not None]
    for case in cases:
        for value in (case.get(key) for key in PATH_KEYS):
            files.extend(value if isinstance(value, list) else [value] if isinstance(value, str) else [])
    return files


def output_files(cases: list[dict], task_name: str, folder: Path) -> list[Path]:
    """Every file the run may write (masks, montages, saliency maps, lung masks, predictions.csv)."""
    stems = [f"{case['case']}_{what}" for case in cases for what in (task_name, "saliency", "lung_seg")]
    return [folder / "predictions.csv", *(folder / f"{stem}{ext}" for stem in stems for ext in (".nii.gz", ".png"))]


def write_rows(path: Path, rows: list[dict], *, default_columns: tuple[str, ...] = ("case",)) -> None:
    """A CSV file with one line per row (columns: the first row's keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(default_columns))
        writer.writeheader()
        writer.writerows(rows)


def _check_fill_nan(task: Task, config: VolumeConfig, fill_nan: float | None) -> None:
    """Refuse ``fill_nan`` for a task whose volume loader would not apply it."""
    if fill_nan is None:
        return
    loader = task.preprocessing(config, keys=(IMAGE_KEY,))[0]
    if getattr(loader, "fill_nan", None) != fill_nan:
        raise ValueError(f"--fill_nan: task {task.name} does not support filling NaN voxels")
