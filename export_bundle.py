"""Export a volumetric checkpoint (lung_seg, lesion_seg, covid_cls: the tasks with a bundle) as a MONAI bundle.

Canonical command::

    python export_bundle.py --task lesion_seg --ckpt runs/lesion_seg/checkpoint_best.pth --out bundles/lesion_seg

The bundle holds ``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt`` (the
network's state dict) and ``docs/README.md``. Its inference config uses MONAI alone, so it runs
without this repository and reproduces ``infer_volumetric.py`` on NIfTI scans (masks on the input's
grid; for covid_cls the COVID-19 probability from the scan and its lung mask)::

    cd bundles/lesion_seg
    python -m monai.bundle run --config_file configs/inference.json --input_file scan.nii.gz --output_dir out

(``python -m monai.bundle`` needs the ``fire`` package.) After writing, the bundle is parsed with
MONAI's ConfigParser and the weights are loaded strictly into the network it defines.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.volumetric.bundle.writer import export_bundle, exportable_tasks
from models.volumetric.cli import add_checkpoint_arg, add_output_arg, add_task_arg
from utils.cli import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arg(parser, choices=exportable_tasks(), help="task of the checkpoint (required)")
    add_checkpoint_arg(parser)
    add_output_arg(parser, dest="out", required=True, help="bundle folder to write; must be new or empty (required)")
    parser.add_argument("--version", default="0.1.0", help="bundle version in metadata.json (default: 0.1.0)")
    parser.add_argument("--authors", default="covid-ct project", help="metadata authors (default: covid-ct project)")
    parser.add_argument("--copyright", default="Copyright (c) the covid-ct project authors",
                        help="metadata copyright (default: Copyright (c) the covid-ct project authors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an existing bundle folder (default: off)")
    return parser


def main(args: argparse.Namespace) -> Path:
    """Write the bundle; returns its folder."""
    return export_bundle(ckpt_path=args.ckpt, task_name=args.task, out_dir=args.out, version=args.version,
                         authors=args.authors, copyright=args.copyright, overwrite=args.overwrite)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
