"""Segment CT volumes with a volumetric checkpoint; masks come out on each input's own grid.

Canonical command::

    python infer_volumetric.py --task lung_seg --ckpt runs/lung_seg/checkpoint_best.pth \\
        --input scan.nii.gz --output runs/lung_seg/infer

``--input`` is a NIfTI file, a DICOM series folder (or one file of it), or a dataset.json (its
--section is segmented). Each volume is pre-processed with the settings stored in the checkpoint,
segmented with a sliding window (the task's ROI and overlap, Gaussian blending unless
``--blend_mode constant``) and the mask is resampled back with MONAI's inverse transforms:
``<case>_<task>.nii.gz`` has exactly the input's shape and affine. ``<case>_<task>.png`` shows axial slices with the mask overlaid, and
``predictions.csv`` lists every case with its foreground volume in millilitres. A volume with NaN
or infinite voxels is refused unless ``--fill_nan HU`` says what they stand for, and no output may
replace an input (checked before anything is written).

covid_cls (``--task covid_cls``) writes the COVID-19 probability of each case to predictions.csv. A
case's lung mask is its ``label_image`` in a dataset.json; without one, the lung_seg checkpoint
``--lung_ckpt`` segments the lungs first (``<case>_lung_seg.nii.gz``). ``--saliency gradcam|gradcampp``
adds ``<case>_saliency.nii.gz`` (input's shape and affine) and a PNG overlay::

    python infer_volumetric.py --task covid_cls --ckpt runs/covid_cls/checkpoint_best.pth \\
        --input scan.nii.gz --lung_ckpt runs/lung_seg/checkpoint_best.pth --saliency gradcam --output out
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datasets.volumes import PATH_KEYS
from models.volumetric import task_names, task_stage
from models.volumetric.common import BLEND_MODES, CROP_REGIONS, IMAGE_KEY
from models.volumetric.inference import input_cases, load_task_model, predict_case, save_mask
from utils.cli import add_device_args, resolve_device, run_cli
from utils.paths import refuse_overwriting_inputs
from utils.plots_volume import axial_montage


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=task_names(), help="task the checkpoint was trained for (required)")
    parser.add_argument("--ckpt", required=True, help="checkpoint from train_volumetric.py (required)")
    parser.add_argument("--input", required=True, help="NIfTI file, DICOM folder/file or dataset.json (required)")
    parser.add_argument("--output", required=True, help="folder for masks, montages and predictions.csv (required)")
    parser.add_argument("--data_root", default=None, help="dataset.json input: folder its paths are relative to (default: its folder)")
    parser.add_argument("--section", default="testing", help="dataset.json input: section to segment (default: testing)")
    parser.add_argument("--overlap", type=float, nargs="+", default=None, help="window overlap, one value or x y z (default: the checkpoint's)")
    parser.add_argument("--sw_batch_size", type=int, default=None, help="windows per network call (default: the checkpoint's)")
    parser.add_argument("--crop_region", choices=CROP_REGIONS, default=None,
                        help="region the windows cover, background elsewhere (default: the task's, body for lung_seg, lung for lesion_seg)")
    parser.add_argument("--blend_mode", choices=BLEND_MODES, default=None,
                        help="blending of overlapping windows; constant is MONAI's default (default: the checkpoint's, gaussian)")
    parser.add_argument("--no_montage", action="store_true", help="skip the PNG montages (default: write them)")
    parser.add_argument("--amp", action="store_true", help="mixed precision inside the network (default: off)")
    parser.add_argument("--saliency", choices=("gradcam", "gradcampp"), default=None, help="covid_cls: write a saliency map per case (default: none)")
    parser.add_argument("--lung_ckpt", default=None, help="covid_cls: lung_seg checkpoint for cases without a lung mask (default: none)")
    parser.add_argument("--fill_nan", type=float, default=None, metavar="HU",
                        help="HU value that replaces NaN and infinite voxels of the input, e.g. -1000 for air "
                             "(default: refuse such volumes)")
    add_device_args(parser)
    return parser


def write_case_outputs(out: dict, folder: Path, *, task_name: str, window: tuple[float, float],
                       montage: bool) -> dict:
    """Mask NIfTI (+ montage PNG) of one case; returns its predictions.csv row."""
    stem = f"{out['case']}_{task_name}"
    mask_path = save_mask(out["mask"], out["affine"], folder / f"{stem}.nii.gz")
    png = ""
    if montage:
        png = axial_montage(out["image"], out["mask"], folder / f"{stem}.png", affine=out["affine"], window=window,
                            title=f"{out['case']}: {task_name}")
    voxel_ml = abs(float(np.linalg.det(out["affine"][:3, :3]))) / 1000.0
    voxels = int((out["mask"] > 0).sum())
    return {"case": out["case"], "mask": str(mask_path), "montage": str(png), "foreground_voxels": voxels,
            "foreground_ml": round(voxels * voxel_ml, 3)}


def main(args: argparse.Namespace) -> list[dict]:
    """Segment every input case; returns the predictions.csv rows."""
    device = resolve_device(args.device)
    cases = input_cases(args.input, data_root=args.data_root, section=args.section)
    if not cases:
        raise ValueError(f"--input {args.input}: no cases in section {args.section!r}")
    folder = Path(args.output)
    refuse_overwriting_inputs(input_files(args, cases), output_files(cases, task_name=args.task, folder=folder))
    model, task, config, _ = load_task_model(args.ckpt, device=device, task_name=args.task)
    overlap = args.overlap[0] if args.overlap and len(args.overlap) == 1 else args.overlap
    config = config.replace(overlap=overlap, sw_batch_size=args.sw_batch_size,
                            crop_region=args.crop_region, blend_mode=args.blend_mode, fill_nan=args.fill_nan)
    _check_fill_nan(task, config, args.fill_nan)
    if task.kind != "segmentation":
        rows = _infer_other_kind(args, cases, model=model, task=task, config=config, device=device, folder=folder)
    else:
        rows = _segment_cases(args, cases, model=model, task=task, config=config, device=device, folder=folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} case(s) -> {folder}")
    return rows


def input_files(args: argparse.Namespace, cases: list[dict]) -> list[str]:
    """Every file the run reads: the input, the checkpoints and each case's volumes."""
    paths = [args.input, args.ckpt, args.lung_ckpt]
    for case in cases:
        for value in (case.get(key) for key in PATH_KEYS):
            paths.extend(value if isinstance(value, list) else [value] if isinstance(value, str) else [])
    return paths


def output_files(cases: list[dict], *, task_name: str, folder: Path) -> list[Path]:
    """Every file the run may write (masks, montages, saliency maps, lung masks, predictions.csv)."""
    stems = [f"{case['case']}_{what}" for case in cases for what in (task_name, "saliency", "lung_seg")]
    return [folder / "predictions.csv", *(folder / f"{stem}{ext}" for stem in stems for ext in (".nii.gz", ".png"))]


def _check_fill_nan(task, config, fill_nan: float | None) -> None:
    """Refuse ``--fill_nan`` for a task whose volume loader would not apply it."""
    if fill_nan is None:
        return
    loader = task.preprocessing(config, keys=(IMAGE_KEY,))[0]
    if getattr(loader, "fill_nan", None) != fill_nan:
        raise ValueError(f"--fill_nan: task {task.name} does not support filling NaN voxels")


def _infer_other_kind(args, cases, *, model, task, config, device, folder: Path) -> list[dict]:
    """covid_cls: probabilities, saliency maps, lung masks from --lung_ckpt where needed."""
    infer_cases = task_stage(task, "infer_cases", None)
    if infer_cases is None:
        raise ValueError(f"task {task.name} has no inference output; use its checkpoint with train_volumetric.py")
    lung = load_task_model(args.lung_ckpt, device=device, task_name="lung_seg")[:3] if args.lung_ckpt else None
    return infer_cases(cases, model=model, config=config, device=device, output=folder, saliency=args.saliency,
                       lung_model=lung)


def _segment_cases(args, cases, *, model, task, config, device, folder: Path) -> list[dict]:
    rows = []
    for case in tqdm(cases, desc="infer"):
        out = predict_case(case, model=model, task=task, config=config, device=device, amp=args.amp)
        rows.append(write_case_outputs(out, folder, task_name=task.name, window=config.hu_window,
                                       montage=not args.no_montage))
    return rows


if __name__ == "__main__":
    run_cli(main, get_args_parser())
