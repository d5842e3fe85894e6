"""The segmentation stages a task gets unless it defines its own: pre-processing, one case, validation, inference.

A case is pre-processed with its task's transforms (orientation, spacing, window), its class
probabilities come from the sliding-window inferer (:mod:`models.volumetric.sliding_window`) and
are mapped back to the input's own grid (one axis at a time, :mod:`models.volumetric.resample_back`,
or MONAI's ``Invertd`` for an oblique scan), where the argmax and the task's post-processing run:
the mask has exactly the input's shape and affine.
:func:`bundle_preprocessing` is the MONAI-bundle form of :func:`seg_preprocessing`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscreted, Compose, Invertd, Orientationd, ScaleIntensityRanged, Spacingd
from tqdm import tqdm

from datasets.io import Volume, write_nifti
from models.volumetric.common import IMAGE_KEY, LABEL_KEY, LoadVolumed, apply_transform, case_name
from models.volumetric.config import SegConfig
from models.volumetric.resample_back import resample_back, separable_axes
from models.volumetric.sliding_window import segment_probabilities
from utils.dice import dice_per_class, mean_ignoring_nan
from utils.plots_volume import axial_montage

PRED_KEY = "pred"
# Any label value above zero is foreground (lung: 1 left / 2 right; lesion: 1 GGO / 2 consolidation).
FOREGROUND_THRESHOLD = 0.5


def seg_preprocessing(config: SegConfig, *, keys: Sequence[str] = (IMAGE_KEY, LABEL_KEY)) -> list:
    """Deterministic pre-processing: load, orient, resample, window the image, binarise the label.

    Args:
        config: the task's settings.
        keys: ``("image",)`` at inference, ``("image", "label")`` with ground truth.

    Returns:
        Dictionary transforms; ``image`` ends as Float[1, X, Y, Z] in [0, 1], ``label`` in {0, 1}.
    """
    keys = tuple(keys)
    modes = tuple("bilinear" if k == IMAGE_KEY else "nearest" for k in keys)
    low, high = config.hu_window
    transforms = [
        LoadVolumed(keys, strict_hu=config.strict_hu, fill_nan=config.fill_nan),
        Orientationd(keys, axcodes=config.orientation, labels=None),
        Spacingd(keys, pixdim=config.spacing, mode=modes),
        ScaleIntensityRanged(IMAGE_KEY, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ]
    if LABEL_KEY in keys:
        transforms.append(AsDiscreted(LABEL_KEY, threshold=FOREGROUND_THRESHOLD))
    return transforms


def bundle_preprocessing(config: SegConfig) -> list[dict]:
    """:func:`seg_preprocessing` of the image alone as MONAI bundle transforms (NIfTI through nibabel)."""
    low, high = config.hu_window
    return [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": config.orientation, "labels": None},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(config.spacing), "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
    ]


def segment_case(case: dict, *, model: torch.nn.Module, task, config: SegConfig, device: torch.device,
                 amp: bool = False) -> dict:
    """Segment one case and map the mask back onto the input's grid.

    Args:
        case: ``{"image": path}`` (a NIfTI file or a DICOM folder/file), optionally ``"label"`` and
            ``"case"``.
        model: network in eval mode on ``device``, logits Float[B, C, x, y, z].
        task: the :class:`models.volumetric.task.Task` (its pre- and post-processing).
        config, device, amp: see :func:`models.volumetric.sliding_window.segment`.

    Returns:
        dict with ``case`` (name), ``mask`` UInt8[X, Y, Z] on the input grid, ``affine`` Float64[4, 4]
        (the input's), ``image`` Float32[X, Y, Z] input HU, and ``label`` UInt8[X, Y, Z] binary
        ground truth when the case has one.

    Raises:
        ValueError: naming the case for unreadable or invalid input.
    """
    # A class number 0 is a label too: LoadVolumed refuses it clearly instead of it being ignored.
    keys = (IMAGE_KEY, LABEL_KEY) if case.get(LABEL_KEY) not in (None, "") else (IMAGE_KEY,)
    transforms = task.preprocessing(config, keys=keys)
    loaded = apply_transform(transforms[0], case)
    rest = Compose(transforms[1:])
    data = apply_transform(rest, dict(loaded))
    probs = segment_probabilities(model, data[IMAGE_KEY], config=config, device=device, amp=amp)
    labels = inverted_argmax(probs, data, rest, original=loaded[IMAGE_KEY])
    mask = _check_geometry(task.postprocessing(config)(labels), loaded[IMAGE_KEY], case_name(case))
    out = {"case": case_name(case), "mask": mask, "affine": _affine(loaded[IMAGE_KEY]),
           "image": np.asarray(loaded[IMAGE_KEY][0], dtype=np.float32)}
    if LABEL_KEY in loaded:
        out["label"] = (np.asarray(loaded[LABEL_KEY][0]) > 0).astype(np.uint8)
    return out


def inverted_argmax(probs: torch.Tensor, data: dict, transform: Compose, original: torch.Tensor) -> torch.Tensor:
    """The argmax, on the input's grid, of class probabilities mapped back there one class at a time.

    Each class's probability map is inverted with the image's own interpolation (trilinear), so the
    mask's boundary falls between working-grid voxels instead of following their blocks as a
    nearest-neighbour inversion of the label map does (on the phantom's lungs, a label map taken
    to 1.5 x 1.5 x 3 mm and back that way keeps a Dice of only 0.95-0.96 with itself; README).
    One class at a time bounds the memory at three input-sized maps for any number of classes.
    When the working grid is not oblique to the input's, the inversion runs one axis at a time
    (:mod:`models.volumetric.resample_back`, the same values to float rounding); otherwise through
    MONAI's ``Invertd``.

    Args:
        probs: Float[C, x, y, z] class probabilities on the working grid.
        data: the pre-processed case (its ``image`` carries the transforms to invert).
        transform: the pre-processing that was applied after loading.
        original: the loaded image MetaTensor[1, X, Y, Z], before ``transform``.

    Returns:
        UInt8[1, X, Y, Z] MetaTensor on the input's grid.
    """
    axes = separable_axes(data[IMAGE_KEY], original)
    best = labels = None
    for c in range(probs.shape[0]):
        if axes is None:
            data[PRED_KEY] = MetaTensor(probs[c:c + 1])
            p = Invertd(PRED_KEY, transform=transform, orig_keys=IMAGE_KEY, nearest_interp=False)(data)[PRED_KEY]
        else:
            p = MetaTensor(resample_back(probs[c], axes, original.shape[1:])[None], meta=original.meta)
        if best is None:
            best, labels = p, torch.zeros(p.shape, dtype=torch.uint8)
            continue
        better = p.as_tensor() > best.as_tensor()
        labels[better] = c
        best = torch.maximum(best, p)
    return MetaTensor(labels, meta=best.meta)


def save_mask(mask: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a label map Int[X, Y, Z] (values 0..255) as uint8 NIfTI with ``affine`` as sform and qform."""
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(affine))
    labels = np.asarray(mask).astype(np.uint8)
    return write_nifti(Volume(labels, np.asarray(affine, dtype=np.float64), spacing, str(path)), path)


def validate_cases(cases: list[dict], *, model: torch.nn.Module, task, config: SegConfig,
                   device: torch.device, amp: bool = False, ignore_empty: bool = False,
                   mask_dir: str | Path | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Dice of every case on the input's own grid, and the summary.

    Args:
        cases: dicts with ``image`` and ``label`` paths (and ``case``).
        model, task, config, device, amp: see :func:`segment_case`.
        ignore_empty: exclude cases with empty ground truth instead of the 1.0/0.0 convention.
        mask_dir: also write each predicted mask there as ``<case>_<task>.nii.gz``.
        progress: show a progress bar.

    Returns:
        (rows for predictions.csv, summary for metrics.csv/metrics.json).
    """
    rows = []
    for case in tqdm(cases, desc="validate", disable=not progress):
        if case.get(LABEL_KEY) in (None, ""):
            raise ValueError(f"case {case_name(case)}: validation needs a 'label' file")
        out = segment_case(case, model=model, task=task, config=config, device=device, amp=amp)
        dice = dice_per_class(out["mask"] > 0, out["label"] > 0, num_classes=2, ignore_empty=ignore_empty)[0]
        mask_path = ""
        if mask_dir:
            mask_path = save_mask(out["mask"], out["affine"], Path(mask_dir) / f"{out['case']}_{task.name}.nii.gz")
        rows.append({"case": out["case"], "image": case[IMAGE_KEY], "label": case[LABEL_KEY],
                     "prediction": str(mask_path), "dice": dice, "label_voxels": int(out["label"].sum()),
                     "predicted_voxels": int((out["mask"] > 0).sum())})
    summary = {"task": task.name, "cases": len(rows),
               "empty_ground_truth_cases": sum(r["label_voxels"] == 0 for r in rows),
               "mean_dice": mean_ignoring_nan(r["dice"] for r in rows), "ignore_empty": ignore_empty}
    return rows, summary


def validation_report(rows: list[dict], summary: dict) -> list[str]:
    """Lines printed after validation: each case's Dice, then the mean."""
    return [f"{row['case']}: dice {row['dice']:.4f}" for row in rows] + [
        f"mean dice {summary['mean_dice']:.4f} over {summary['cases']} cases"]


def infer_cases(cases: list[dict], *, model: torch.nn.Module, task, config: SegConfig, device: torch.device,
                output: str | Path, amp: bool = False, montage: bool = True, progress: bool = True,
                **_: object) -> list[dict]:
    """Segment cases; write each mask (and montage) to ``output``; rows for predictions.csv."""
    rows = []
    for case in tqdm(cases, desc="infer", disable=not progress):
        out = segment_case(case, model=model, task=task, config=config, device=device, amp=amp)
        rows.append(write_case_outputs(out, Path(output), task_name=task.name, window=config.hu_window,
                                       montage=montage))
    return rows


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


def _check_geometry(inverted: torch.Tensor, original: torch.Tensor, name: str) -> np.ndarray:
    if tuple(inverted.shape) != tuple(original.shape):
        raise RuntimeError(f"case {name}: inverted mask shape {tuple(inverted.shape)} differs from the "
                           f"input's {tuple(original.shape)}")
    if hasattr(inverted, "affine") and not np.allclose(_affine(inverted), _affine(original), atol=1e-4):
        raise RuntimeError(f"case {name}: inverted mask affine differs from the input's")
    return np.asarray(inverted[0].detach().cpu().numpy()).round().astype(np.uint8)


def _affine(volume: torch.Tensor) -> np.ndarray:
    return np.asarray(volume.affine.detach().cpu().numpy(), dtype=np.float64)
