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
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from datasets.conventions import LUNG_WINDOW, hu_to_png
from datasets.io import NotHUError, NotHUWarning, Volume, read_volume, write_nifti
from datasets.png_stack import read_png_stack
from models.volumetric.covid_cls import MASK_KEY
from models.volumetric.inference import load_task_model, predict_case, save_mask
from models.volumetric.saliency import save_saliency_outputs
from utils import quantify as q
from utils.checkpoint import load_checkpoint
from utils.classification_metrics import to_jsonable
from utils.cli import add_device_args, resolve_device, run_cli
from utils.manifest import MissingModelError, resolve_model, sha256_file
from utils.model_io import load_model_for_inference
from utils.paths import refuse_overwriting_inputs
from utils.scan_report import write_report

# Pipeline model -> (flag, manifest name, the script that trains it).
MODELS = {"lung_seg": ("lung_ckpt", "lung_seg", "train_volumetric.py --task lung_seg"),
          "lesion_seg": ("lesion_ckpt", "lesion_seg", "train_volumetric.py --task lesion_seg"),
          "covid_cls": ("covid3d_ckpt", "covid_cls", "train_volumetric.py --task covid_cls"),
          "mask_net_classifier": ("covid2d_ckpt", "mask_net_classifier",
                                  "train_segmentation.py, then train_classifier.py")}
CLASSIFIER_BUILDER = "models.mask_net.covid_mask_net"
COVID_CLASS = 2  # slice classes: 0 Control, 1 CP, 2 COVID-19
LUNG_SLICE_FRACTION = 0.25  # 2D step: slices with at least this fraction of the largest lung area
LESION_MARGIN_VOXELS = 2  # lesions this close to the lung (in-plane) count as lung
SCAN_CASE = "scan"  # case name of the 3D classifier, which names its saliency files
# Every file a run may write into --out; none may be an input.
OUTPUT_FILES = ("scan.nii.gz", "lungs.nii.gz", "lesions.nii.gz", "report.json", "report.html", "montage_lungs.png",
                "montage_lesions.png", "slice_profile.png", f"{SCAN_CASE}_saliency.nii.gz", f"{SCAN_CASE}_saliency.png")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="NIfTI file, DICOM folder, or folder of PNG/JPG slices of one scan")
    p.add_argument("--out", required=True, help="output folder for masks, report.json and report.html (required)")
    p.add_argument("--models_dir", default="pretrained_models",
                   help="folder with manifest.json, used for each model not given by its flag (default: pretrained_models)")
    p.add_argument("--lung_ckpt", help="lung_seg checkpoint (default: from the manifest)")
    p.add_argument("--lesion_ckpt", help="lesion_seg checkpoint (default: from the manifest)")
    p.add_argument("--covid3d_ckpt", help="covid_cls checkpoint (default: from the manifest)")
    p.add_argument("--covid2d_ckpt", help="COVID-CT-Mask-Net classifier checkpoint (default: from the manifest)")
    p.add_argument("--skip", nargs="*", default=[], choices=["covid_cls", "mask_net_classifier"],
                   help="classifiers to leave out, e.g. when no such model exists (default: none)")
    p.add_argument("--consolidation_hu", type=float, default=q.CONSOLIDATION_MIN_HU,
                   help=f"lesion voxels at or above this HU are consolidation, below GGO (default: {q.CONSOLIDATION_MIN_HU})")
    p.add_argument("--slice_window", type=float, nargs=2, default=LUNG_WINDOW,
                   help=f"HU window of the 2D model's slice pictures (default: {LUNG_WINDOW[0]} {LUNG_WINDOW[1]})")
    p.add_argument("--png_window", type=float, nargs=2, default=LUNG_WINDOW,
                   help=f"HU that grey 0 and 255 of PNG slices stand for (default: {LUNG_WINDOW[0]} {LUNG_WINDOW[1]})")
    p.add_argument("--png_spacing", type=float, nargs=3, default=(0.7, 0.7, 5.0),
                   help="column, row and slice spacing of PNG slices in mm (default: 0.7 0.7 5.0)")
    p.add_argument("--batch_size", type=int, default=8, help="slices per batch of the 2D model (default: 8)")
    p.add_argument("--allow_non_hu", action="store_true",
                   help="analyse a volume whose intensities do not look like Hounsfield units; the warning goes "
                        "into the report (default: refuse it)")
    p.add_argument("--fill_nan", type=float, default=None, metavar="HU",
                   help="HU value that replaces NaN and infinite voxels, e.g. -1000 for air; the report says so "
                        "(default: refuse such volumes)")
    add_device_args(p)
    return p


def resolve_model_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Checkpoint path of every model the run needs: its flag, else the manifest's entry.

    Raises:
        MissingModelError: naming the model, where it was looked for and how to produce it.
    """
    paths = {}
    for name, (flag, entry, trainer) in MODELS.items():
        if name in args.skip:
            continue
        given = getattr(args, flag)
        if given:
            if not Path(given).is_file():
                raise MissingModelError(f"{name}: --{flag} {given} does not exist")
            paths[name] = Path(given)
            continue
        try:
            paths[name] = resolve_model(args.models_dir, entry)
        except MissingModelError as err:
            raise MissingModelError(f"{name} model missing: pass --{flag} CKPT (trained with {trainer}; "
                                    f"see README.md), or register it in {args.models_dir}/. {err}") from err
    return paths


def load_scan(path: str | Path, *, out: Path, png_window, png_spacing, allow_non_hu: bool = False,
              fill_nan: float | None = None) -> tuple[Volume, Path, dict | None]:
    """The scan as a HU volume, a file the 3D models can read (the input, or ``scan.nii.gz``), and
    the assumptions made: for a folder of slices, and ``fill_nan`` (None when there are none).

    Args:
        path: NIfTI file, DICOM folder or folder of slice pictures.
        out: output folder, for ``scan.nii.gz``.
        png_window, png_spacing: what slice pictures stand for (see :func:`read_png_stack`).
        allow_non_hu: warn about intensities that do not look like HU instead of refusing them.
        fill_nan: HU value for NaN and infinite voxels; None refuses them.

    Raises:
        FileNotFoundError, ValueError: naming the input when it is missing, unreadable, not in HU
            (unless ``allow_non_hu``) or holds NaN voxels (unless ``fill_nan``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir() and not any(f.suffix.lower() == ".dcm" or _is_dicom(f) for f in path.iterdir() if f.is_file()):
        volume = read_png_stack(path, window=png_window, spacing=png_spacing)
        assumed = {"png_window_hu": list(png_window), "png_spacing_mm": list(png_spacing)}
        return volume, write_nifti(volume, out / "scan.nii.gz"), assumed
    try:
        volume = read_volume(path, strict_hu=not allow_non_hu, fill_nan=fill_nan)
    except NotHUError as err:
        raise NotHUError(f"{err}; lesion types and volumes would be wrong (--allow_non_hu analyses it anyway)") from err
    if fill_nan is None:
        return volume, path, None
    return volume, write_nifti(volume, out / "scan.nii.gz"), {"fill_nan_hu": fill_nan}  # the models read it filled


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


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def segment(name: str, ckpt: Path, image_path: Path, *, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Binary mask (UInt8[X, Y, Z] on the input grid) of a volumetric segmentation model, and its affine."""
    model, task, config, _ = load_task_model(ckpt, device=device, task_name=name)
    out = predict_case({"image": str(image_path), "case": image_path.name}, model=model, task=task, config=config,
                       device=device)
    return (out["mask"] > 0).astype(np.uint8), out["affine"]


def lungs_and_lesions(lung: np.ndarray, lesion: np.ndarray, image_hu: np.ndarray, affine: np.ndarray, *,
                      consolidation_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Left/right lung labels and GGO/consolidation labels from the two binary masks.

    Lesion voxels count when they lie within :data:`LESION_MARGIN_VOXELS` of the lungs' in-plane
    outline (holes filled); the lung mask then takes them in.

    Returns:
        UInt8[X, Y, Z] lungs (:data:`utils.quantify.LUNG_LEFT`/``LUNG_RIGHT``) and UInt8[X, Y, Z]
        lesions (:data:`utils.quantify.LESION_GGO`/``LESION_CONSOLIDATION``).
    """
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    hull = ndimage.binary_fill_holes(lung > 0, structure=in_plane)
    hull = ndimage.binary_dilation(hull, structure=in_plane, iterations=LESION_MARGIN_VOXELS)
    lesion = (lesion > 0) & hull
    lungs = q.split_lungs((lung > 0) | lesion, affine)
    return lungs, q.lesion_types(lesion, image_hu, consolidation_min_hu=consolidation_hu)


def covid_probability_3d(ckpt: Path, image_path: Path, lungs_path: Path, *, device: torch.device, out: Path) -> dict:
    """The 3D classifier's COVID-19 probability and its GradCAM map (written under ``out``)."""
    from models.volumetric.covid_cls import predict_case as classify

    model, _, config, _ = load_task_model(ckpt, device=device, task_name="covid_cls")
    result = classify({"image": str(image_path), MASK_KEY: str(lungs_path), "case": SCAN_CASE}, model=model,
                      config=config, device=device, saliency="gradcam")
    files = save_saliency_outputs(result, out, hu_window=config.hu_window)
    return {"probability": result["probability"], "threshold": config.threshold, **files}


def lung_slices(lungs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Indices (display order, inferior first) of the slices the 2D classifier reads."""
    from utils.plots_volume import display_slices

    area = (display_slices(lungs > 0, affine)).sum(axis=(1, 2))
    return np.flatnonzero(area >= LUNG_SLICE_FRACTION * area.max()) if area.max() else np.arange(0)


@torch.inference_mode()
def covid_probability_2d(ckpt: Path, image_hu: np.ndarray, lungs: np.ndarray, affine: np.ndarray, *,
                         window: tuple[float, float], device: torch.device, batch_size: int) -> dict:
    """COVID-CT-Mask-Net's scan probability: the mean slice softmax over the lung slices.

    Args:
        image_hu: Float[X, Y, Z] HU; lungs: Int[X, Y, Z]; affine: Float64[4, 4] of both.
        window: HU range drawn as grey 0..255, as in the 2D training slices.

    Returns:
        ``probability`` (COVID-19), ``class_probabilities`` (Control, CP, COVID-19), ``slices`` (their
        indices) and ``slice_probabilities`` (COVID-19, per slice).
    """
    from utils.plots_volume import display_slices

    picks = lung_slices(lungs, affine)
    if picks.size == 0:
        raise ValueError("2D classifier: the lung mask is empty, so there is no lung slice to classify")
    model, _ = load_model_for_inference(str(ckpt), device=device, flags={}, builder=CLASSIFIER_BUILDER,
                                        kind="classification", architecture_flags=())
    slices = display_slices(image_hu, affine)[picks]  # [S, rows, cols] HU
    probs = []
    for start in range(0, len(slices), batch_size):
        batch = [torch.from_numpy(hu_to_png(s, window)).float().div_(255).expand(3, -1, -1).to(device)
                 for s in slices[start:start + batch_size]]  # each Float[3, rows, cols] in [0, 1]
        probs.append(torch.softmax(model(batch).double(), dim=1).cpu())
    probs = torch.cat(probs).numpy()  # [S, 3]
    mean = probs.mean(axis=0)
    return {"probability": float(mean[COVID_CLASS]), "class_probabilities": mean.tolist(),
            "slices": picks.tolist(), "slice_probabilities": probs[:, COVID_CLASS].tolist()}


def model_card(name: str, path: Path) -> dict:
    """What the report says about a model: its file, hash and how it was built and trained."""
    ckpt = load_checkpoint(path)
    return {"name": name, "path": str(path), "sha256": sha256_file(path), "builder": ckpt["builder"],
            "builder_kwargs": ckpt["builder_kwargs"], "epoch": ckpt["epoch"], "task": ckpt.get("task", name)}


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    out = Path(args.out)
    paths = resolve_model_paths(args)  # fail before any work when a model is missing
    refuse_overwriting_inputs([args.input, *paths.values()], [out / name for name in OUTPUT_FILES])
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(4 + len(paths) - 2)  # read, two segmentations, the classifiers, report
    with warnings.catch_warnings(record=True) as caught:  # every warning of the analysis goes into the report
        try:
            scan = analyse(args, paths, out=out, device=device, steps=steps)
        finally:  # shown also when the analysis fails
            messages = run_warnings(caught)
            for message in messages:
                print(f"warning: {message}", file=sys.stderr)
    report = _report(args, scan, paths, steps.seconds, messages)
    with steps("report"):
        page = write_report(report, scan["volume"].array, scan["lungs"], scan["lesions"], scan["affine"], out)
    print(f"report: {page}")
    return report


def analyse(args: argparse.Namespace, paths: dict[str, Path], *, out: Path, device: torch.device,
            steps: _Steps) -> dict:
    """Read the scan, segment lungs and lesions, write the masks and run the classifiers.

    Returns:
        ``volume`` (:class:`Volume`), ``affine`` Float64[4, 4], ``lungs`` and ``lesions`` UInt8[X, Y, Z],
        ``covid`` (per classifier), ``files`` (written masks) and ``assumed`` (dict or None).
    """
    with steps("reading the scan"):
        volume, image_path, assumed = load_scan(args.input, out=out, png_window=args.png_window,
                                                png_spacing=args.png_spacing, allow_non_hu=args.allow_non_hu,
                                                fill_nan=args.fill_nan)
    with steps("lung segmentation"):
        lung, affine = segment("lung_seg", paths["lung_seg"], image_path, device=device)
    with steps("lesion segmentation"):
        lesion, _ = segment("lesion_seg", paths["lesion_seg"], image_path, device=device)
    lungs, lesions = lungs_and_lesions(lung, lesion, volume.array, affine, consolidation_hu=args.consolidation_hu)
    files = {"lungs": str(save_mask(lungs, affine, out / "lungs.nii.gz")),
             "lesions": str(save_mask(lesions, affine, out / "lesions.nii.gz"))}
    covid = {}
    if "covid_cls" in paths:
        with steps("3D COVID-19 classifier"):
            covid["covid_cls"] = covid_probability_3d(paths["covid_cls"], image_path, Path(files["lungs"]),
                                                      device=device, out=out)
    if "mask_net_classifier" in paths:
        with steps("2D COVID-CT-Mask-Net classifier"):
            covid["mask_net_classifier"] = covid_probability_2d(
                paths["mask_net_classifier"], volume.array, lungs, affine, window=tuple(args.slice_window),
                device=device, batch_size=args.batch_size)
    return {"volume": volume, "affine": affine, "lungs": lungs, "lesions": lesions, "covid": covid, "files": files,
            "assumed": assumed}


def _report(args, scan: dict, paths, seconds, messages: list[str]) -> dict:
    """The report dict, also written as ``report.json``."""
    volume, affine = scan["volume"], scan["affine"]
    report = {"input": str(args.input), "warnings": messages,
              "grid": {"shape": list(volume.array.shape), "spacing_mm": list(volume.spacing),
                       "affine": np.asarray(affine).tolist()},
              "quantities": q.quantify(scan["lungs"], scan["lesions"], affine),
              "conventions": {"lesion_types": f"Hounsfield bands: consolidation >= {args.consolidation_hu} HU, "
                                              "GGO below, inside the lesion mask",
                              "severity_score": "per lung, 0 none, 1 <5%, 2 5-25%, 3 25-50%, 4 50-75%, 5 >=75% "
                                                "of the lung involved; total 0-10",
                              "lungs": "1 left, 2 right", "lesions": "1 GGO, 2 consolidation"},
              "covid": scan["covid"], "models": [model_card(n, p) for n, p in paths.items()], "files": scan["files"],
              "seconds": seconds}
    if scan["assumed"]:
        report["assumed"] = scan["assumed"]
    (Path(args.out) / "report.json").write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    return report


class _Steps:
    """``with steps("name"):`` prints ``[i/n] name`` and its time, and keeps the times."""

    def __init__(self, total: int):
        self.total, self.done, self.seconds = total, 0, {}

    def __call__(self, name: str):
        self.done += 1
        self._name = name
        print(f"[{self.done}/{self.total}] {name} ...", flush=True)
        self._start = time.time()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.seconds[self._name] = round(time.time() - self._start, 1)
            print(f"      done in {self.seconds[self._name]:.1f} s", flush=True)
        return False


if __name__ == "__main__":
    run_cli(main, get_args_parser())
