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

from models.volumetric.cli import (
    add_checkpoint_arg,
    add_datalist_args,
    add_output_arg,
    add_section_arg,
    add_task_arg,
)
from models.volumetric.common import VALIDATION
from models.volumetric.validation import validate
from utils.cli import add_amp_arg, add_device_args, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arg(parser)
    add_checkpoint_arg(parser)
    add_datalist_args(parser, what="listing image and label files")
    add_section_arg(parser, default=VALIDATION, what="to validate")
    add_output_arg(parser, dest="output", required=False,
                   help="folder for metrics.csv, metrics.json, predictions.csv "
                        "(default: <ckpt folder>/validate_<section>)")
    parser.add_argument("--ignore_empty", action="store_true",
                        help="exclude cases with empty ground truth from the mean (default: off, they score 1.0 when "
                             "the prediction is empty too, else 0.0)")
    parser.add_argument("--save_masks", action="store_true",
                        help="also write each predicted mask as NIfTI in --output (default: off)")
    add_amp_arg(parser)
    add_device_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    """Validate; returns the summary (means and counts)."""
    return validate(task_name=args.task, ckpt=args.ckpt, datalist=args.datalist, data_root=args.data_root,
                    section=args.section, output=args.output, ignore_empty=args.ignore_empty,
                    save_masks=args.save_masks, amp=args.amp, device=args.device)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
