"""Convert DICOM series to NIfTI in Hounsfield units, one ``.nii.gz`` per SeriesInstanceUID.

Canonical command::

    python convert_dicom.py data/dicom/patient01 data/nifti/patient01

RescaleSlope/RescaleIntercept are applied (HU; int16 when every value is an integer, else
float32), slices are ordered by ImagePositionPatient, and spacing and orientation are kept in the
affine (DICOM LPS converted to NIfTI RAS). Files are named after the SeriesDescription, else the
UID. A series with a missing slice, duplicate positions, or slices of different size, spacing or
orientation is refused with a message naming the series and files; nothing is written then. So is
an output folder that is the input folder or lies inside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets.io import convert_dicom_folder
from utils.cli import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input_dir", type=Path, help="folder of DICOM files; non-DICOM files are skipped (required)")
    p.add_argument("output_dir", type=Path, help="folder for the .nii.gz files, created when missing (required)")
    p.add_argument("--recursive", action="store_true", help="also read DICOM files in sub-folders (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: off, refuse)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    paths = convert_dicom_folder(args.input_dir, args.output_dir, recursive=args.recursive, overwrite=args.overwrite)
    for path in paths:
        print(path)
    print(f"{len(paths)} series written to {args.output_dir}")
    return paths


if __name__ == "__main__":
    run_cli(main, get_args_parser())
