"""Segment CT volumes with a volumetric checkpoint; masks come out on each input's own grid.

Canonical command::

    python infer_volumetric.py --task lung_seg --ckpt runs/lung_seg/checkpoint_best.pth \\
        --input scan.nii.gz --output runs/lung_seg/infer

``--input`` is a NIfTI file, a DICOM series folder (or one file of it), or a dataset.json (its
--section is segmented; ``test`` and ``testing`` name one section). Each volume is pre-processed
with the settings stored in the checkpoint, segmented with a sliding window (the task's ROI and
overlap, Gaussian blending unless ``--blend_mode constant``) and the mask is resampled back with
MONAI's inverse transforms: ``<case>_<task>.nii.gz`` has exactly the input's shape and affine.
``<case>_<task>.png`` shows axial slices with the mask overlaid, and ``predictions.csv`` lists every
case with its foreground volume in millilitres. A volume with NaN or infinite voxels is refused
unless ``--fill_nan HU`` says what they stand for, and no output may replace an input (checked
before anything is written). The work is ``models.volumetric.inference.infer``.

covid_cls (``--task covid_cls``) writes the COVID-19 probability of each case to predictions.csv. A
case's lung mask is its ``label_image`` in a dataset.json; without one, the lung_seg checkpoint
``--lung_ckpt`` segments the lungs first (``<case>_lung_seg.nii.gz``). ``--saliency gradcam|gradcampp``
adds ``<case>_saliency.nii.gz`` (input's shape and affine) and a PNG overlay::

    python infer_volumetric.py --task covid_cls --ckpt runs/covid_cls/checkpoint_best.pth \\
        --input scan.nii.gz --lung_ckpt runs/lung_seg/checkpoint_best.pth --saliency gradcam --output out
"""
from __future__ import annotations

import argparse

from models.volumetric.cli import (
    add_checkpoint_arg,
    add_data_root_arg,
    add_output_arg,
    add_section_arg,
    add_task_arg,
    add_window_args,
    window_overrides,
)
from models.volumetric.common import TEST
from models.volumetric.inference import infer
from utils.cli import add_amp_arg, add_device_args, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arg(parser)
    add_checkpoint_arg(parser)
    parser.add_argument("--input", required=True, help="NIfTI file, DICOM folder/file or dataset.json (required)")
    add_output_arg(parser, dest="output", required=True,
                   help="folder for masks, montages and predictions.csv (required)")
    add_data_root_arg(parser, what="a dataset.json input's paths are relative to")
    add_section_arg(parser, default=TEST, what="of a dataset.json input to segment")
    add_window_args(parser, default="the checkpoint's")
    parser.add_argument("--no_montage", action="store_true", help="skip the PNG montages (default: write them)")
    add_amp_arg(parser)
    parser.add_argument("--saliency", choices=("gradcam", "gradcampp"), default=None,
                        help="covid_cls: write a saliency map per case (default: none)")
    parser.add_argument("--lung_ckpt", default=None,
                        help="covid_cls: lung_seg checkpoint for cases without a lung mask (default: none)")
    parser.add_argument("--fill_nan", type=float, default=None, metavar="HU",
                        help="HU value that replaces NaN and infinite voxels of the input, e.g. -1000 for air "
                             "(default: refuse such volumes)")
    add_device_args(parser)
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    """Run the checkpoint on every input case; returns the predictions.csv rows."""
    return infer(task_name=args.task, ckpt=args.ckpt, input_path=args.input, output=args.output,
                 data_root=args.data_root, section=args.section, window=window_overrides(args), fill_nan=args.fill_nan,
                 montage=not args.no_montage, amp=args.amp, saliency=args.saliency, lung_ckpt=args.lung_ckpt,
                 device=args.device)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
