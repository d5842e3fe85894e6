"""One chest CT in, a report out: lungs, lesions, percent of lung involved, COVID-19 probability.

Canonical command (models from the ``pretrained_models/`` manifest, or each from its flag)::

    python analyze_scan.py data/phantom/volumes/imagesTr/chest_2003.nii.gz --out runs/analyze/chest_2003 \\
        --lung_ckpt L.pth --lesion_ckpt S.pth --covid3d_ckpt C.pth --covid2d_ckpt M.pth

INPUT is a NIfTI file, a DICOM folder (one series) or a folder of PNG/JPG slices of one scan. The
pipeline:

1. lung segmentation (lung_seg, AH-Net), split into left and right lung by position;
2. lesion segmentation (lesion_seg, SegResNet), kept inside the lungs; the lung mask is extended
   by the lesions it encloses, because dense consolidation is often left out of it;
3. COVID-19 probability of the 3D classifier (covid_cls, DenseNet121) on the lung region, with
   its GradCAM map;
4. COVID-19 probability of the 2D COVID-CT-Mask-Net, the mean of its slice probabilities over the
   slices that hold at least a quarter of the largest slice's lung area.

Lesions are split into ground-glass opacity and consolidation by Hounsfield band
(:mod:`utils.quantify`), not by the 2D model's classes. ``--out`` receives ``lungs.nii.gz`` (1 left,
2 right) and ``lesions.nii.gz`` (1 GGO, 2 consolidation) on the input's own grid, the saliency map,
``report.json`` and ``report.html`` with montages. A folder of slices has neither Hounsfield units
nor geometry: ``--png_window`` and ``--png_spacing`` state them, and the stacked volume is written
as ``scan.nii.gz``.

Input that would give a clean-looking but wrong report is refused: intensities that do not look like
Hounsfield units (``--allow_non_hu`` goes on anyway), NaN or infinite voxels (``--fill_nan HU``
replaces them; the filled volume is written as ``scan.nii.gz``), slice pictures with missing slice
numbers, and an ``--out`` where an output would replace an input. Every warning of the analysis is
listed in ``report.json`` ("warnings") and at the top of ``report.html``.

A cohort: INPUT may also be a folder of scans (NIfTI files and/or sub-folders of one DICOM series or
slice pictures each), a ``.txt``/``.csv`` list of scan paths, or a MONAI ``dataset.json``
(``--section``, default testing). The models are loaded once; ``--out`` gets one folder per scan id
(what a one-scan run writes), written under ``.tmp-<id>`` and renamed when complete, and
``cohort.csv`` with a row per scan (``cohort.html`` shows them). ``--workers K`` reads the next scans
in K processes meanwhile. A bad scan is listed as an error and the others go on (the exit
status is 1 when any failed); a scan already analysed with the same models is skipped, so a killed
run is continued by running it again::

    python analyze_scan.py data/scans --out runs/cohort                    # or scans.txt, dataset.json
    python analyze_scan.py data/scans --out runs/cohort --shard 0/4         # one of 4 jobs: cohort-shard-0-of-4.csv
    python -m models.analysis.cohort merge runs/cohort                     # the shards' tables -> cohort.csv
    torchrun --nproc_per_node 4 analyze_scan.py data/scans --out runs/cohort  # shard = rank; rank 0 merges

From Python (load the models once, analyse many scans): :func:`models.analysis.load_models` and
:func:`models.analysis.analyze`, which this script calls.
"""
from __future__ import annotations

import argparse

from datasets.conventions import LUNG_WINDOW
from models.analysis import CLASSIFIERS, MODELS, PNG_SPACING, analyze, cohort, load_models
from utils import quantify as q
from utils.cli import add_amp_arg, add_device_args, non_negative_int, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="NIfTI file, DICOM folder, or folder of PNG/JPG slices of one scan; or a cohort: a "
                                 "folder of scans, a .txt/.csv list of scan paths, or a dataset.json")
    p.add_argument("--out", required=True, help="output folder for masks, report.json and report.html; for a cohort, "
                                                "one such folder per scan and cohort.csv (required)")
    p.add_argument("--section", default=cohort.DEFAULT_SECTION,
                   help=f"section of a dataset.json input (default: {cohort.DEFAULT_SECTION})")
    p.add_argument("--shard", type=cohort.parse_shard, default=None, metavar="I/N",
                   help="analyse only part I of N of a cohort (0 <= I < N) and write cohort-shard-I-of-N.csv; "
                        "under torchrun the rank and world size choose it (default: the whole cohort)")
    p.add_argument("--models_dir", default="pretrained_models",
                   help="folder with manifest.json, used for each model not given by its flag "
                        "(default: pretrained_models)")
    p.add_argument("--lung_ckpt", help="lung_seg checkpoint (default: from the manifest)")
    p.add_argument("--lesion_ckpt", help="lesion_seg checkpoint (default: from the manifest)")
    p.add_argument("--covid3d_ckpt", help="covid_cls checkpoint (default: from the manifest)")
    p.add_argument("--covid2d_ckpt", help="COVID-CT-Mask-Net classifier checkpoint (default: from the manifest)")
    p.add_argument("--skip", nargs="*", default=[], choices=list(CLASSIFIERS),
                   help="classifiers to leave out, e.g. when no such model exists (default: none)")
    p.add_argument("--consolidation_hu", type=float, default=q.CONSOLIDATION_MIN_HU,
                   help="lesion voxels at or above this HU are consolidation, below GGO "
                        f"(default: {q.CONSOLIDATION_MIN_HU})")
    p.add_argument("--slice_window", type=float, nargs=2, default=LUNG_WINDOW,
                   help=f"HU window of the 2D model's slice pictures (default: {LUNG_WINDOW[0]} {LUNG_WINDOW[1]})")
    p.add_argument("--png_window", type=float, nargs=2, default=LUNG_WINDOW,
                   help=f"HU that grey 0 and 255 of PNG slices stand for (default: {LUNG_WINDOW[0]} {LUNG_WINDOW[1]})")
    p.add_argument("--png_spacing", type=float, nargs=3, default=PNG_SPACING,
                   help="column, row and slice spacing of PNG slices in mm (default: {} {} {})".format(*PNG_SPACING))
    p.add_argument("--batch_size", type=int, default=8, help="slices per batch of the 2D model (default: 8)")
    p.add_argument("--allow_non_hu", action="store_true",
                   help="analyse a volume whose intensities do not look like Hounsfield units; the warning goes "
                        "into the report (default: refuse it)")
    p.add_argument("--fill_nan", type=float, default=None, metavar="HU",
                   help="HU value that replaces NaN and infinite voxels, e.g. -1000 for air; the report says so "
                        "(default: refuse such volumes)")
    p.add_argument("--workers", "--num_workers", dest="workers", type=non_negative_int, default=0,
                   help="cohort: processes that read the next scans while the models run on the current one "
                        "(default: 0, each scan read in turn)")
    add_amp_arg(p, inference=True)
    add_device_args(p)
    return p


def main(args: argparse.Namespace) -> dict | list[dict]:
    """One scan: its report.json dict. A cohort: its table's rows (:class:`cohort.CohortFailed` when a scan failed)."""
    scans = cohort.find_scans(args.input, section=args.section, exclude=args.out)
    print(scans.describe(args.input), flush=True)
    options = dict(consolidation_hu=args.consolidation_hu, slice_window=args.slice_window,
                   png_window=args.png_window, png_spacing=args.png_spacing, batch_size=args.batch_size,
                   allow_non_hu=args.allow_non_hu, fill_nan=args.fill_nan)

    def models(device):  # loaded when first needed (lazy): a bad single scan is refused before any model loads
        return load_models(args.models_dir, device=device, skip=args.skip, lazy=True, amp=args.amp,
                           checkpoints={name: getattr(args, spec.flag) for name, spec in MODELS.items()})

    if scans.kind == "scan":
        return analyze(args.input, models(args.device), out_dir=args.out, **options).summary
    return cohort.run_cohort(scans, models, out_dir=args.out, device=args.device, shard=args.shard,
                             workers=args.workers, **options)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
