"""Segment CT volumes with a volumetric checkpoint; masks come out on each input's own grid.

Canonical command::

    python infer_volumetric.py --task lung_seg --ckpt runs/lung_seg/checkpoint_best.pth \\
        --input scan.nii.gz --output runs/lung_seg/infer

``--input`` is a NIfTI file, a DICOM series folder (or one file of it), or a dataset.json (its
--section is segmented). Each volume is pre-processed with the settings stored in the checkpoint,
segmented with a sliding window (the task's ROI and overlap, Gaussian blending) and the mask is
resampled back with MONAI's inverse transforms: ``<case>_<task>.nii.gz`` has exactly the input's
shape and affine. ``<case>_<task>.png`` shows axial slices with the mask overlaid, and
``predictions.csv`` lists every case with its foreground volume in millilitres.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.volumetric import task_names
from models.volumetric.inference import input_cases, load_task_model, predict_case, save_mask
from utils.cli import add_device_args, resolve_device
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
    parser.add_argument("--no_body_crop", action="store_true", help="slide windows over the whole volume, not just the body box (default: body box)")
    parser.add_argument("--no_montage", action="store_true", help="skip the PNG montages (default: write them)")
    parser.add_argument("--amp", action="store_true", help="mixed precision inside the network (default: off)")
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
    model, task, config, _ = load_task_model(args.ckpt, device=device, task_name=args.task)
    overlap = args.overlap[0] if args.overlap and len(args.overlap) == 1 else args.overlap
    config = config.replace(overlap=overlap, sw_batch_size=args.sw_batch_size,
                            body_crop=False if args.no_body_crop else None)
    cases = input_cases(args.input, data_root=args.data_root, section=args.section)
    if not cases:
        raise ValueError(f"--input {args.input}: no cases in section {args.section!r}")
    folder = Path(args.output)
    rows = []
    for case in tqdm(cases, desc="infer"):
        out = predict_case(case, model=model, task=task, config=config, device=device, amp=args.amp)
        rows.append(write_case_outputs(out, folder, task_name=task.name, window=config.hu_window,
                                       montage=not args.no_montage))
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} case(s) -> {folder}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
