"""One scan through the pipeline: read, segment, quantify, classify, and write the report."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.conventions import LUNG_WINDOW
from datasets.io import NotHUWarning, Volume
from models.volumetric.segmentation import save_mask
from utils import quantify as q
from utils.classification_metrics import to_jsonable
from utils.paths import refuse_overwriting_inputs
from utils.scan_report import write_report

from . import steps
from .loading import CLASSIFIERS, Models
from .scan import PNG_SPACING, SCAN_FILE, Scan, read_scan

# Every file a run may write into its output folder; none may be an input.
OUTPUT_FILES = (SCAN_FILE, "lungs.nii.gz", "lesions.nii.gz", "report.json", "report.html", "montage_lungs.png",
                "montage_lesions.png", "slice_profile.png", f"{steps.SCAN_CASE}_saliency.nii.gz",
                f"{steps.SCAN_CASE}_saliency.png")
CONVENTIONS = {"severity_score": "per lung, 0 none, 1 <5%, 2 5-25%, 3 25-50%, 4 50-75%, 5 >=75% of the lung "
                                 "involved; total 0-10",
               "lungs": "1 left, 2 right; only inside the body (the voxels above the lung model's body threshold "
                        "and what they enclose in their axial slice)",
               "lesions": "1 GGO, 2 consolidation"}


@dataclass
class Report:
    """The result of one analysis.

    Attributes:
        summary: the ``report.json`` dict: ``input``, ``warnings``, ``grid``, ``quantities``,
            ``conventions``, ``covid`` (per classifier), ``models``, ``files``, ``seconds``, and
            ``assumed`` when something was assumed.
        volume: the scan in HU (``array`` Float32[X, Y, Z], ``affine``).
        lungs: UInt8[X, Y, Z] 0 background, 1 left, 2 right lung, on the scan's grid.
        lesions: UInt8[X, Y, Z] 0 none, 1 GGO, 2 consolidation, on the scan's grid.
        affine: Float64[4, 4] voxel -> RAS+ mm of the masks.
        page: ``report.html``, or None when nothing was kept (no ``out_dir``).
    """

    summary: dict
    volume: Volume
    lungs: np.ndarray
    lesions: np.ndarray
    affine: np.ndarray
    page: Path | None


def analyze(scan: str | os.PathLike | np.ndarray | Volume | Scan, models: Models, *,
            out_dir: str | os.PathLike | None = None,
            consolidation_hu: float = q.CONSOLIDATION_MIN_HU, slice_window: tuple[float, float] = LUNG_WINDOW,
            png_window: tuple[float, float] = LUNG_WINDOW, png_spacing: tuple[float, float, float] = PNG_SPACING,
            affine: np.ndarray | None = None, batch_size: int = 8, allow_non_hu: bool = False,
            fill_nan: float | None = None, verbose: bool = True) -> Report:
    """One chest CT in, a report out: lungs, lesions, percent of lung involved, COVID-19 probability.

    Args:
        scan: NIfTI file, DICOM folder (one series), folder of PNG/JPG slices, a :class:`Volume`,
            Float[X, Y, Z] HU with ``affine``, or a :class:`Scan` already read by :func:`read_scan` (into
            ``out_dir``; the read options are then not used).
        models: from :func:`models.analysis.load_models`; the classifiers it holds are run.
        out_dir: folder for the masks, saliency map, ``report.json`` and ``report.html``; None keeps
            nothing on disk (the report's ``files`` is then empty).
        consolidation_hu: lesion voxels at or above this HU are consolidation, below GGO.
        slice_window: HU window of the 2D model's slice pictures.
        png_window, png_spacing: what slice pictures stand for (HU of grey 0 and 255; mm).
        affine: Float64[4, 4] voxel -> RAS+ mm of an array ``scan``.
        batch_size: slices per batch of the 2D model.
        allow_non_hu: analyse intensities that do not look like HU (the warning goes into the report).
        fill_nan: HU value that replaces NaN and infinite voxels; None refuses such scans.
        verbose: print each step, its time and the warnings.

    Returns:
        The :class:`Report`; with ``out_dir``, also written there as ``report.json`` and ``report.html``
        next to ``lungs.nii.gz``, ``lesions.nii.gz`` and the pictures.

    Raises:
        FileNotFoundError, ValueError: naming the input when it is missing or unusable, or an output
            that would replace an input (checked before anything is written).
    """
    options = dict(consolidation_hu=consolidation_hu, slice_window=tuple(slice_window), batch_size=batch_size,
                   read=dict(png_window=tuple(png_window), png_spacing=tuple(png_spacing), affine=affine,
                             allow_non_hu=allow_non_hu, fill_nan=fill_nan), verbose=verbose)
    if out_dir is not None:
        return _analyze(scan, models, out=Path(out_dir), keep=True, **options)
    with tempfile.TemporaryDirectory(prefix="analysis-") as tmp:
        return _analyze(scan, models, out=Path(tmp), keep=False, **options)


def _analyze(scan, models: Models, *, out: Path, keep: bool, consolidation_hu: float, slice_window, batch_size: int,
             read: dict, verbose: bool) -> Report:
    """:func:`analyze` with its output folder (a temporary one when ``keep`` is False)."""
    inputs = [scan] if isinstance(scan, (str, os.PathLike)) else [scan.source] if isinstance(scan, Scan) else []
    refuse_overwriting_inputs([*inputs, *models.paths.values()], [out / name for name in OUTPUT_FILES])
    out.mkdir(parents=True, exist_ok=True)
    classifiers = [name for name in CLASSIFIERS if name in models]
    progress = _Progress(3 + len(classifiers) + keep, verbose=verbose)  # read, two segmentations, classifiers, report
    with warnings.catch_warnings(record=True) as caught:  # every warning of the analysis goes into the report
        try:
            result = _run(scan, models, out=out, progress=progress, consolidation_hu=consolidation_hu,
                          slice_window=slice_window, batch_size=batch_size, read=read)
        finally:  # shown also when the analysis fails
            messages = run_warnings(caught)
            if verbose:
                for message in messages:
                    print(f"warning: {message}", file=sys.stderr)
    summary = _summary(result, models, seconds=progress.seconds, messages=messages, consolidation_hu=consolidation_hu)
    report = Report(summary, result["scan"].volume, result["lungs"], result["lesions"], result["affine"], None)
    return _write(report, out, progress=progress, verbose=verbose) if keep else _forget_files(report)


def _run(scan, models: Models, *, out: Path, progress: _Progress, consolidation_hu: float, slice_window,
         batch_size: int, read: dict) -> dict:
    """Read the scan, segment lungs and lesions, write the masks and run the classifiers.

    Returns:
        ``scan`` (:class:`Scan`), ``affine`` Float64[4, 4], ``lungs`` and ``lesions`` UInt8[X, Y, Z],
        ``covid`` (per classifier) and ``files`` (written masks).
    """
    with progress("reading the scan"):
        if isinstance(scan, Scan):
            scan.warn_again()
        else:
            scan = read_scan(scan, out_dir=out, **read)
    with progress("lung segmentation"):
        lung, affine = steps.segment("lung_seg", scan.image_path, models=models)
    with progress("lesion segmentation"):
        lesion, _ = steps.segment("lesion_seg", scan.image_path, models=models)
    lungs, lesions = steps.lungs_and_lesions(lung, lesion, scan.volume.array, affine, consolidation_hu=consolidation_hu,
                                             body_threshold_hu=models.get("lung_seg").config.body_threshold_hu)
    files = {"lungs": str(save_mask(lungs, affine, out / "lungs.nii.gz")),
             "lesions": str(save_mask(lesions, affine, out / "lesions.nii.gz"))}
    covid = {}
    if "covid_cls" in models:
        with progress("3D COVID-19 classifier"):
            covid["covid_cls"] = steps.covid_probability_3d(scan.image_path, Path(files["lungs"]), models=models,
                                                            out=out)
    if "mask_net_classifier" in models:
        with progress("2D COVID-CT-Mask-Net classifier"):
            covid["mask_net_classifier"] = steps.covid_probability_2d(
                scan.volume.array, lungs, affine, models=models, window=slice_window, batch_size=batch_size)
    return {"scan": scan, "affine": affine, "lungs": lungs, "lesions": lesions, "covid": covid, "files": files}


def run_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings of a run as "Category: message", each once.

    The models' loaders repeat the reader's not-HU warning for the same scan, so only the first
    NotHUWarning is kept.
    """
    unique = {}
    for w in caught:
        key = NotHUWarning if issubclass(w.category, NotHUWarning) else (w.category, str(w.message))
        unique.setdefault(key, f"{w.category.__name__}: {w.message}")
    return list(unique.values())


def _summary(result: dict, models: Models, *, seconds: dict, messages: list[str], consolidation_hu: float) -> dict:
    """The ``report.json`` dict of a run."""
    scan, affine = result["scan"], result["affine"]
    lesion_types = f"Hounsfield bands: consolidation >= {consolidation_hu} HU, GGO below, inside the lesion mask"
    summary = {"input": scan.source, "warnings": messages,
               "grid": {"shape": list(scan.volume.array.shape), "spacing_mm": list(scan.volume.spacing),
                        "affine": np.asarray(affine).tolist()},
               "quantities": q.quantify(result["lungs"], result["lesions"], affine),
               "conventions": {"lesion_types": lesion_types, **CONVENTIONS},
               "covid": result["covid"], "models": models.cards(), "files": result["files"], "seconds": seconds}
    if scan.assumed:
        summary["assumed"] = scan.assumed
    return summary


def _write(report: Report, out: Path, *, progress: _Progress, verbose: bool) -> Report:
    """Write ``report.json``, then the pictures and ``report.html``, then ``report.json`` again with the
    report's own time in ``seconds`` (the first copy stays when drawing fails)."""
    _write_json(report.summary, out)
    with progress("report"):
        report.page = write_report(report.summary, report.volume.array, report.lungs, report.lesions, report.affine,
                                   out)
    _write_json(report.summary, out)
    if verbose:
        print(f"report: {report.page}")
    return report


def _write_json(summary: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")


def _forget_files(report: Report) -> Report:
    """Drop the paths of files that lived only in a temporary folder."""
    report.summary["files"] = {}
    for result in report.summary["covid"].values():
        for key in ("saliency", "overlay"):
            result.pop(key, None)
    return report


class _Progress:
    """``with progress("name"):`` prints ``[i/n] name`` and its time, and keeps the times."""

    def __init__(self, total: int, *, verbose: bool = True):
        self.total, self.done, self.seconds, self.verbose = total, 0, {}, verbose

    def __call__(self, name: str):
        self.done += 1
        self._name = name
        if self.verbose:
            print(f"[{self.done}/{self.total}] {name} ...", flush=True)
        self._start = time.time()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.seconds[self._name] = round(time.time() - self._start, 1)
            if self.verbose:
                print(f"      done in {self.seconds[self._name]:.1f} s", flush=True)
        return False
