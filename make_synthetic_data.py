"""Write the chest-CT phantom data set (CNCB, COVIDx-CT and Clara/MSD layouts) and its montages.

Canonical command::

    python make_synthetic_data.py --out data/phantom --seed 0

Layouts and label maps are documented in ``datasets/synthetic/__init__.py``. The same seed writes
the same files; ``--workers`` changes only the speed.
"""
from __future__ import annotations

import argparse
import os
import time

from datasets.synthetic import generate_dataset
from datasets.synthetic.writers import OUTPUTS
from utils.cli import non_negative_int, positive_int, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/phantom", help="output folder (default: data/phantom)")
    p.add_argument("--seed", type=int, default=0, help="data-set seed (default: 0)")
    p.add_argument("--n_patients", type=non_negative_int, default=60,
                   help="patients of the classification set (default: 60)")
    p.add_argument("--n_seg_patients", type=non_negative_int, default=80,
                   help="patients of the segmentation set, split 60/20/20 into train/val/test (default: 80)")
    p.add_argument("--slices_per_patient", type=positive_int, default=8, help="slices per 2D patient (default: 8)")
    p.add_argument("--image_size", type=positive_int, default=512,
                   help="side of the 2D slices in pixels (default: 512)")
    p.add_argument("--n_volumes", type=non_negative_int, default=12,
                   help="chest volumes; 12 put every class in the validation split (default: 12)")
    p.add_argument("--volume_splits", type=float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "VAL", "TEST"),
                   help="shares of the chest volumes in the training, validation and test splits "
                        "(default: 0.6 0.2 0.2)")
    p.add_argument("--volume_shape", type=positive_int, nargs=3, default=[128, 128, 40], metavar=("X", "Y", "Z"),
                   help="chest volume shape; Z is the slice count at 2.5 mm spacing (default: 128 128 40)")
    p.add_argument("--n_abdomen", type=non_negative_int, default=4, help="abdomen volumes (default: 4)")
    p.add_argument("--abdomen_shape", type=positive_int, nargs=3, default=[96, 96, 48], metavar=("X", "Y", "Z"),
                   help="abdomen volume shape (default: 96 96 48)")
    p.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=OUTPUTS,
                   help=f"which outputs to write (default: {' '.join(OUTPUTS)})")
    p.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1),
                   help="parallel processes (default: min(2, number of CPUs))")
    p.add_argument("--no_montage", action="store_true", help="skip the montage pictures (default: off)")
    return p


def main(args: argparse.Namespace) -> dict:
    start = time.time()
    summary = generate_dataset(
        args.out, seed=args.seed, n_patients=args.n_patients, n_seg_patients=args.n_seg_patients,
        slices_per_patient=args.slices_per_patient, image_size=args.image_size, volume_shape=tuple(args.volume_shape),
        n_volumes=args.n_volumes, volume_fractions=tuple(args.volume_splits), n_abdomen=args.n_abdomen,
        abdomen_shape=tuple(args.abdomen_shape),
        outputs=tuple(args.outputs), workers=args.workers, montage=not args.no_montage)
    print(f"Phantom data set (seed {args.seed}) written to {args.out} in {time.time() - start:.1f} s")
    for key in ("seg", "cls", "volumes", "abdomen"):
        if key in summary:
            part = summary[key]
            counts = part.get("slices", part.get("counts"))
            print(f"  {key:8s} {part['root']}  {counts}")
    for path in summary.get("montages", []):
        print(f"  montage  {path}")
    print(f"  summary  {os.path.join(args.out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
