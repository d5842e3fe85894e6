"""Inference for the volumetric segmentation tasks: checkpoint -> model, case -> mask on the input grid.

A case is pre-processed with its task's transforms (orientation, spacing, window), segmented with the
task's sliding-window inferer (windows restricted to the body's bounding box when the config says
so), post-processed, and mapped back to the input's own grid with MONAI's ``Invertd``: the mask has
exactly the input's shape and affine.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from scipy import ndimage

from models.volumetric import get_task
from models.volumetric.common import (
    IMAGE_KEY,
    LABEL_KEY,
    SegConfig,
    Task,
    case_name,
    case_stem,
    hu_to_unit,
    load_cases,
    sliding_window_inferer,
    unwrap_transform_error,
)
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint

PRED_KEY = "pred"
# Windows [B, 1, x, y, z] are handed to the network channels-last: about 2x faster 3D convolutions
# on CPU when the weights are channels-last too (see prepare_for_inference).
CHANNELS_LAST = torch.channels_last_3d


def load_task_model(path: str | Path, *, device: torch.device, task_name: str | None = None
                    ) -> tuple[torch.nn.Module, Task, SegConfig, dict]:
    """Rebuild a volumetric model and its pre-processing settings from a checkpoint.

    Args:
        path: checkpoint written by ``train_volumetric.py``.
        device: target device; the model is returned in eval mode.
        task_name: the task the caller expects (None: take the checkpoint's).

    Raises:
        ValueError: when the checkpoint is not a volumetric one or belongs to another task.
    """
    ckpt = load_checkpoint(path)
    stored = ckpt.get("task")
    if stored is None or "task_config" not in ckpt:
        raise ValueError(f"{path}: not a volumetric checkpoint (no 'task'/'task_config' entries)")
    if task_name is not None and task_name != stored:
        raise ValueError(f"{path}: checkpoint is for task {stored!r}, not {task_name!r}")
    task = get_task(stored)
    config = type(task.default_config).from_dict(ckpt["task_config"])  # SegConfig or a task's own
    model = prepare_for_inference(build_model_from_checkpoint(ckpt), device=device)
    return model, task, config, ckpt


def prepare_for_inference(model: torch.nn.Module, *, device: torch.device) -> torch.nn.Module:
    """Eval mode on ``device`` with channels-last 3D weights (faster convolutions on CPU and CUDA)."""
    return model.eval().to(device=device, memory_format=torch.channels_last_3d)


def crop_box(image: torch.Tensor, *, config: SegConfig) -> tuple[slice, slice, slice] | None:
    """Bounding box of the region the windows need to cover (``config.crop_region``).

    Args:
        image: Float[1, X, Y, Z] pre-processed image (windowed to [0, 1]).
        config: ``crop_region``, ``body_threshold_hu`` and ``crop_margin``.

    Returns:
        One slice per spatial axis, grown by ``crop_margin`` and clipped to the volume; None for
        the whole volume (``"none"``, or nothing found).
    """
    if config.crop_region == "none":
        return None
    body = (image[0] > hu_to_unit(config, config.body_threshold_hu)).cpu().numpy()
    region = _enclosed_dark(body) if config.crop_region == "lung" else body
    return bounding_box(region, margin=config.crop_margin)


def bounding_box(mask: np.ndarray, *, margin: int) -> tuple[slice, slice, slice] | None:
    """Slices of the box around the True voxels of Bool[X, Y, Z], grown by ``margin`` (None if empty)."""
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def window_region(box: tuple[slice, slice, slice] | None, shape, roi_size) -> tuple[slice, slice, slice]:
    """The part of the volume the sliding windows run over: ``box`` grown to at least the ROI.

    Along an axis where ``box`` is shorter than the ROI it is grown about its centre (shifted to
    stay inside the volume) to the ROI, or to the whole axis when the volume is shorter. The number
    of windows is the same, but each window holds the image around the box, as it does when the
    whole volume is segmented, instead of zero padding; the networks' outputs depend on that context
    (GroupNorm statistics, receptive field), so this keeps the box's result close to the whole
    volume's.

    Args:
        box: one slice per axis with explicit bounds (from :func:`crop_box`), or None for everything.
        shape: (X, Y, Z) of the volume.
        roi_size: sliding-window size (x, y, z).

    Returns:
        One slice per axis.
    """
    if box is None:
        return tuple(slice(0, n) for n in shape)
    region = []
    for axis, n, roi in zip(box, shape, roi_size):
        start, stop = axis.start, axis.stop
        if stop - start < roi:
            start = 0 if n <= roi else min(max(start - (roi - (stop - start)) // 2, 0), n - roi)
            stop = min(start + roi, n)
        region.append(slice(start, stop))
    return tuple(region)


def _enclosed_dark(body: np.ndarray) -> np.ndarray:
    """Voxels below the body threshold that the body outline encloses in their axial slice."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(body, structure=in_plane) & ~body


def segment(model: torch.nn.Module, image: torch.Tensor, *, config: SegConfig, device: torch.device,
            amp: bool = False) -> torch.Tensor:
    """Sliding-window segmentation of one pre-processed volume (argmax of the logits).

    Args:
        model: network in eval mode on ``device`` (best via :func:`prepare_for_inference`),
            logits Float[B, C, x, y, z].
        image: Float[1, X, Y, Z] in [0, 1] on the task's working grid.
        config: ROI, overlap, batch of windows and the region the windows cover.
        device: where the windows run.
        amp: autocast to float16/bfloat16 (CUDA/CPU) inside the network.

    Returns:
        UInt8[1, X, Y, Z] label map on ``image``'s grid (background outside the windows' region,
        :func:`window_region` of :func:`crop_box`).
    """
    box = window_region(crop_box(image, config=config), image.shape[1:], config.roi_size)
    region = image.as_tensor() if hasattr(image, "as_tensor") else image
    region = region[(slice(None), *box)][None].to(device)  # [1, 1, x, y, z]
    inferer = sliding_window_inferer(config)
    layout = CHANNELS_LAST if _has_channels_last_weights(model) else torch.contiguous_format
    with torch.inference_mode(), _autocast(device, amp):
        logits = inferer(region, lambda windows: model(windows.contiguous(memory_format=layout)))
    labels = torch.zeros((1, *image.shape[1:]), dtype=torch.uint8)
    labels[(slice(None), *box)] = logits[0].argmax(dim=0).to("cpu", torch.uint8)
    return labels


def predict_case(case: dict, *, model: torch.nn.Module, task: Task, config: SegConfig, device: torch.device,
                 amp: bool = False) -> dict:
    """Segment one case and map the mask back onto the input's grid.

    Args:
        case: ``{"image": path}`` (a NIfTI file or a DICOM folder/file), optionally ``"label"`` and
            ``"case"``.
        model, task, config, device, amp: see :func:`segment`.

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
    loaded = _apply(transforms[0], case)
    rest = Compose(transforms[1:])
    data = _apply(rest, dict(loaded))
    labels = segment(model, data[IMAGE_KEY], config=config, device=device, amp=amp)
    data[PRED_KEY] = MetaTensor(task.postprocessing(config)(labels))
    inverted = Invertd(PRED_KEY, transform=rest, orig_keys=IMAGE_KEY, nearest_interp=True)(data)[PRED_KEY]
    mask = _check_geometry(inverted, loaded[IMAGE_KEY], case_name(case))
    out = {"case": case_name(case), "mask": mask, "affine": _affine(loaded[IMAGE_KEY]),
           "image": np.asarray(loaded[IMAGE_KEY][0], dtype=np.float32)}
    if LABEL_KEY in loaded:
        out["label"] = (np.asarray(loaded[LABEL_KEY][0]) > 0).astype(np.uint8)
    return out


def save_mask(mask: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a label map as NIfTI (uint8) with ``affine`` as both sform and qform (scanner space)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)
    return path


def input_cases(path: str | Path, *, data_root: str | Path | None = None, section: str = "testing") -> list[dict]:
    """Cases from a NIfTI file, a DICOM folder or file, or a ``dataset.json`` datalist.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.suffix == ".json":
        return load_cases(path, data_root=data_root, section=section)
    return [{IMAGE_KEY: str(path), "case": case_stem(path)}]


def _apply(transform, data: dict) -> dict:
    try:
        return transform(data)
    except RuntimeError as err:  # MONAI wraps errors in "applying transform ..."
        raise unwrap_transform_error(err) from err


def _check_geometry(inverted: torch.Tensor, original: torch.Tensor, name: str) -> np.ndarray:
    if tuple(inverted.shape) != tuple(original.shape):
        raise RuntimeError(f"case {name}: inverted mask shape {tuple(inverted.shape)} differs from the "
                           f"input's {tuple(original.shape)}")
    if hasattr(inverted, "affine") and not np.allclose(_affine(inverted), _affine(original), atol=1e-4):
        raise RuntimeError(f"case {name}: inverted mask affine differs from the input's")
    return np.asarray(inverted[0].detach().cpu().numpy()).round().astype(np.uint8)


def _affine(volume: torch.Tensor) -> np.ndarray:
    return np.asarray(volume.affine.detach().cpu().numpy(), dtype=np.float64)


def _has_channels_last_weights(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.ndim == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1), None)
    return weight is not None and weight.is_contiguous(memory_format=CHANNELS_LAST) and not weight.is_contiguous()


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def validate_cases(cases: list[dict], *, model: torch.nn.Module, task: Task, config: SegConfig,
                   device: torch.device, amp: bool = False, ignore_empty: bool = False,
                   mask_dir: str | Path | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Dice of every case on the input's own grid, and the summary.

    Args:
        cases: dicts with ``image`` and ``label`` paths (and ``case``).
        model, task, config, device, amp: see :func:`predict_case`.
        ignore_empty: exclude cases with empty ground truth instead of the 1.0/0.0 convention.
        mask_dir: also write each predicted mask there as ``<case>_<task>.nii.gz``.
        progress: show a progress bar.

    Returns:
        (rows for predictions.csv, summary for metrics.csv/metrics.json).
    """
    from tqdm import tqdm

    from utils.dice import dice_per_class, mean_ignoring_nan

    rows = []
    for case in tqdm(cases, desc="validate", disable=not progress):
        if case.get(LABEL_KEY) in (None, ""):
            raise ValueError(f"case {case_name(case)}: validation needs a 'label' file")
        out = predict_case(case, model=model, task=task, config=config, device=device, amp=amp)
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
