"""Data conventions of the project, defined once and imported everywhere (see docs/ARCHITECTURE.md).

Mask PNG values (CNCB layout), slice classes, ``mask_type`` label maps, the slice file-name
convention ``[Class]_[PatientID]_[ScanNum]_[SliceNum].png`` and the lung window that maps Hounsfield
units to the 8-bit grey levels of slice pictures.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Mask PNG values (CNCB): one value per tissue class.
MASK_BACKGROUND = 0
MASK_LUNG = 1
MASK_GGO = 2
MASK_CONSOLIDATION = 3
MASK_VALUES = (MASK_BACKGROUND, MASK_LUNG, MASK_GGO, MASK_CONSOLIDATION)

# mask_type -> {mask value: detection label}. A label comes from the mask value, never from the
# rank of the values present in one slice.
MASK_TYPE_LABELS: dict[str, dict[int, int]] = {
    "both": {MASK_GGO: 1, MASK_CONSOLIDATION: 2},
    "ggo": {MASK_GGO: 1},
    "merge": {MASK_GGO: 1, MASK_CONSOLIDATION: 1},
}
# Detection label names per mask_type (index 0 is the background).
MASK_TYPE_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "both": ("background", "GGO", "consolidation"),
    "ggo": ("background", "GGO"),
    "merge": ("background", "lesion"),
}

# Slice classes.
CLASS_CONTROL, CLASS_CP, CLASS_COVID = 0, 1, 2
CLASS_NAMES = ("Control", "CP", "COVID-19")
# File-name prefixes (CNCB / COVIDx-CT) -> class index.
CLASS_PREFIXES = {"0": 0, "1": 1, "2": 2, "Normal": 0, "CP": 1, "NCP": 2}
CLASS_TO_PREFIX = {CLASS_CONTROL: "Normal", CLASS_CP: "CP", CLASS_COVID: "NCP"}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# HU mapped to grey 0 and 255 in slice pictures (centre -600, width 1500): the phantom's slices, the
# 2D model's input and the default assumption for a folder of slice pictures.
LUNG_WINDOW = (-1350.0, 150.0)

_SLICE_NAME = re.compile(r"^(?P<cls>[0-2]|Normal|CP|NCP)_(?P<patient>[^_]+)_(?P<scan>[^_]+)_(?P<slice>[^_]+)$")


def num_detection_classes(mask_type: str) -> int:
    """Number of detection classes, background included, for a ``mask_type``.

    Raises:
        ValueError: for an unknown ``mask_type``.
    """
    return len(class_names_for(mask_type))


def class_names_for(mask_type: str) -> tuple[str, ...]:
    """Detection class names (background first) for a ``mask_type``."""
    if mask_type not in MASK_TYPE_LABELS:
        raise ValueError(f"mask_type must be one of {sorted(MASK_TYPE_LABELS)}, got {mask_type!r}")
    return MASK_TYPE_CLASS_NAMES[mask_type]


@dataclass(frozen=True)
class SliceName:
    """Parsed slice file name ``[Class]_[PatientID]_[ScanNum]_[SliceNum].ext``."""

    label: int
    patient: str
    scan: str
    slice: str


def parse_slice_name(path: str | Path) -> SliceName:
    """Parse a slice file name that follows the CNCB / COVIDx-CT convention.

    Args:
        path: file path or name, e.g. ``NCP_96_1328_0032.png`` or ``2_96_1328_0032.png``.

    Returns:
        The class index (0 Control, 1 CP, 2 COVID-19), patient, scan and slice identifiers.

    Raises:
        ValueError: naming the file when it does not follow the convention.
    """
    stem = Path(path).stem
    match = _SLICE_NAME.match(stem)
    if match is None:
        raise ValueError(
            f"{path}: file name does not follow [Class]_[PatientID]_[ScanNum]_[SliceNum] "
            f"with Class one of {sorted(CLASS_PREFIXES)}"
        )
    return SliceName(CLASS_PREFIXES[match["cls"]], match["patient"], match["scan"], match["slice"])


def hu_to_png(hu: np.ndarray, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Map HU to 8-bit grey levels through a window (default lung window: centre -600, width 1500).

    Args:
        hu: array of Hounsfield units, any shape.
        window: (low, high) HU mapped to 0 and 255.

    Returns:
        uint8 array of the same shape.

    Raises:
        ValueError: when ``high <= low``.
    """
    lo, hi = window
    if hi <= lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window!r}")
    scaled = (np.asarray(hu, np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
