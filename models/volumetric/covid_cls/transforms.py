"""The classifier's dictionary transforms: the lung-region pre-processing, augmentation, and their bundle form.

Input: a CT volume in HU (``image``) and its lung mask (``label_image``); ``label`` is 1 for COVID-19
and 0 otherwise. Pre-processing: orientation RAS, window [-1000, 500] HU scaled to [0, 1], optional
masking of the tissue outside the lung to zero (``mask_intensity``; on by default, off in the released
Clara model, whose config calls it ``disable_mask_intensity``) after the mask is shrunk by
``mask_erosion_mm``, crop to the lung's bounding box plus a margin, resize to 192 x 192 x 64.
Augmentation: random flips and small rotations.
:func:`bundle_preprocessing` is the MONAI-bundle form of :func:`preprocessing`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import (
    CropForegroundd,
    MapTransform,
    MaskIntensityd,
    Orientationd,
    RandFlipd,
    RandRotated,
    Resized,
    ScaleIntensityRanged,
)
from scipy import ndimage

from models.volumetric.common import IMAGE_KEY, LABEL_KEY, LoadVolumed, case_name
from models.volumetric.covid_cls.config import ClsConfig
from models.volumetric.sliding_window import bounding_box

MASK_KEY = "label_image"  # the lung mask of a classification case (dataset.json convention)
ROTATION_DEGREES = 10.0


class LoadLungCased(MapTransform):
    """Load ``image`` and its lung mask ``label_image`` with the project's checks; keep ``label``.

    The numeric class ``label`` is set aside while the volumes are read (it is not a file), and
    the two volumes must share one grid. Output: MetaTensor[1, X, Y, Z] for both keys.
    """

    def __init__(self, keys: Sequence[str] = (IMAGE_KEY, MASK_KEY), *, strict_hu: bool = False):
        super().__init__(keys, allow_missing_keys=True)
        self.loader = LoadVolumed(keys, strict_hu=strict_hu)

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        label = data.pop(LABEL_KEY, None)
        name = case_name(data)
        out = self.loader(data)
        if IMAGE_KEY in out and MASK_KEY in out and out[IMAGE_KEY].shape != out[MASK_KEY].shape:
            raise ValueError(f"case {name}: image {data[IMAGE_KEY]} has shape {tuple(out[IMAGE_KEY].shape[1:])} "
                             f"but lung mask {data[MASK_KEY]} has {tuple(out[MASK_KEY].shape[1:])}; "
                             "they must be on the same grid")
        if label is not None:
            out[LABEL_KEY] = _class_label(label, name)
        return out


class ErodeMaskd(MapTransform):
    """Shrink a mask by ``distance_mm``: keep the voxels farther than that from any voxel outside it.

    The distance is Euclidean in mm on the voxel grid (``scipy.ndimage.distance_transform_edt`` with
    the mask's spacing), so an anisotropic scan loses the same thickness along every axis. A mask
    that would vanish is kept as it is. Input and output: MetaTensor[1, X, Y, Z].
    """

    def __init__(self, key: str, distance_mm: float):
        super().__init__(key)
        self.key, self.distance_mm = key, float(distance_mm)

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        mask = data[self.key]
        spacing = [float(s) for s in mask.pixdim[:3]]
        keep = far_from_outside(np.asarray(mask[0]) > 0, spacing=spacing, distance_mm=self.distance_mm)
        if keep.any():
            data[self.key] = mask * torch.as_tensor(keep, dtype=mask.dtype)[None]
        return data


def far_from_outside(inside: np.ndarray, *, spacing, distance_mm: float) -> np.ndarray:
    """Voxels of Bool[X, Y, Z] ``inside`` more than ``distance_mm`` from every voxel outside it.

    The Euclidean distance transform runs on the bounding box of ``inside`` grown by one voxel
    (clipped to the volume), not on the whole volume: every voxel beyond that box is outside, and
    the box's one-voxel rim is nearer to any voxel within than anything beyond, so the result equals
    ``distance_transform_edt(inside, sampling=spacing) > distance_mm`` (on a 512 x 512 x 120 chest
    scan 3.2 s instead of 7.0 s).

    Args:
        inside: Bool[X, Y, Z]; spacing: voxel size (x, y, z) in mm; distance_mm: how far in a kept voxel lies.

    Returns:
        Bool[X, Y, Z].
    """
    keep = np.zeros(inside.shape, bool)
    box = bounding_box(inside, margin=1)
    if box is not None:
        keep[box] = ndimage.distance_transform_edt(inside[box], sampling=spacing) > distance_mm
    return keep


class CheckLungMaskd(MapTransform):
    """Refuse a case whose lung mask is missing or empty, naming the case."""

    def __init__(self, key: str = MASK_KEY):
        super().__init__(key)
        self.key = key

    def __call__(self, data: dict) -> dict:
        name = case_name(data)
        if self.key not in data:
            raise ValueError(f"case {name}: no lung mask ('{self.key}'); give one in dataset.json or "
                             "segment the lungs first (infer_volumetric.py --lung_ckpt)")
        if not bool((data[self.key] > 0).any()):
            raise ValueError(f"case {name}: the lung mask '{self.key}' is empty; cannot crop the lung region")
        return data


def lung_region_transforms(config: ClsConfig) -> list:
    """Orientation, HU window, optional masking and the lung bounding-box crop (no resize).

    Input: ``image`` and ``label_image`` MetaTensor[1, X, Y, Z] on the file's grid. Output: both
    cropped to the lung box plus ``crop_margin`` (clipped to the volume), ``image`` in [0, 1].
    """
    keys = (IMAGE_KEY, MASK_KEY)
    low, high = config.hu_window
    transforms = [
        CheckLungMaskd(MASK_KEY),
        Orientationd(keys, axcodes=config.orientation, labels=None),
        ScaleIntensityRanged(IMAGE_KEY, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ]
    if config.mask_intensity:
        if config.mask_erosion_mm > 0:
            transforms.append(ErodeMaskd(MASK_KEY, config.mask_erosion_mm))
        transforms.append(MaskIntensityd(IMAGE_KEY, mask_key=MASK_KEY))
    transforms.append(CropForegroundd(keys, source_key=MASK_KEY, margin=tuple(config.crop_margin),
                                      allow_smaller=True))
    return transforms


def preprocessing(config: ClsConfig, *, keys: Sequence[str] = (IMAGE_KEY, MASK_KEY)) -> list:
    """Deterministic pre-processing: load, lung-region crop, resize to ``roi_size``.

    Args:
        config: the task's settings.
        keys: volume keys to load; the lung mask ``label_image`` is always loaded (a case without
            one is refused, naming it) and ``label`` is the numeric class, never a file.

    Returns:
        Dictionary transforms; ``image`` ends as Float[1, *roi_size] in [0, 1] and ``label_image``
        as Float[1, *roi_size] in {0, 1, ...}; a numeric ``label`` passes through as float.
    """
    keys = tuple(k for k in dict.fromkeys((*keys, MASK_KEY)) if k != LABEL_KEY)
    return [
        LoadLungCased(keys, strict_hu=config.strict_hu),
        *lung_region_transforms(config),
        Resized((IMAGE_KEY, MASK_KEY), spatial_size=tuple(config.roi_size), mode=("trilinear", "nearest")),
    ]


def bundle_preprocessing(config: ClsConfig) -> list[dict]:
    """:func:`preprocessing` of a NIfTI scan and its lung mask as MONAI bundle transforms.

    The project's checks (HU, a lung mask present and not empty) are not carried over.
    """
    keys = [IMAGE_KEY, MASK_KEY]
    low, high = config.hu_window
    transforms = [
        {"_target_": "LoadImaged", "keys": keys, "reader": "NibabelReader", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": keys, "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": keys, "axcodes": config.orientation, "labels": None},
        {"_target_": "ScaleIntensityRanged", "keys": IMAGE_KEY, "a_min": low, "a_max": high, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
    ]
    if config.mask_intensity:
        if config.mask_erosion_mm > 0:
            erode = _bundle_erosion(config.mask_erosion_mm)
            transforms.append({"_target_": "Lambdad", "keys": MASK_KEY, "func": erode})
        transforms.append({"_target_": "MaskIntensityd", "keys": IMAGE_KEY, "mask_key": MASK_KEY})
    return transforms + [
        {"_target_": "CropForegroundd", "keys": keys, "source_key": MASK_KEY,
         "margin": list(config.crop_margin), "allow_smaller": True},
        {"_target_": "Resized", "keys": keys, "spatial_size": list(config.roi_size), "mode": ["trilinear", "nearest"]},
    ]


def _bundle_erosion(distance_mm: float) -> str:
    """:class:`ErodeMaskd` as a bundle expression on a MetaTensor[1, X, Y, Z] (the bundle imports
    ``from scipy import ndimage``)."""
    keep = (f"ndimage.distance_transform_edt(m[0].numpy() > 0, sampling=[float(s) for s in m.pixdim[:3]]) "
            f"> {distance_mm!r}")
    return f"$lambda m: (lambda k: m * torch.as_tensor(k, dtype=m.dtype)[None] if k.any() else m)({keep})"


def augmentation(config: ClsConfig) -> list:
    """Random flips (left-right, anterior-posterior) and a small rotation in the axial plane."""
    keys = (IMAGE_KEY, MASK_KEY)
    angle = math.radians(ROTATION_DEGREES)
    return [
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotated(keys, range_z=angle, prob=0.5, mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]


def _class_label(value: Any, name: str) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"case {name}: label must be 0 or 1, got {value!r}") from None
    if label not in (0.0, 1.0):
        raise ValueError(f"case {name}: label must be 0 or 1, got {value!r}")
    return label
