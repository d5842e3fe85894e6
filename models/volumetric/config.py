"""Settings of the volumetric tasks, stored in checkpoints: the shared base and the segmentation config.

Every task's settings are a frozen dataclass derived from :class:`VolumeConfig`, which gives them one
way to be copied with changes, written to a checkpoint and read back. The classifier's own settings
(``ClsConfig``) live with the covid_cls task.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CROP_REGIONS = ("body", "lung", "none")
BLEND_MODES = ("gaussian", "constant")


@dataclass(frozen=True)
class VolumeConfig:
    """Base of the task settings: changes, checkpoint round trip and the checks they share."""

    def replace(self, **changes: Any) -> "VolumeConfig":
        """A copy with ``changes`` applied (None values are ignored), validated again.

        Raises:
            ValueError: for a setting this config does not have, listing those it has.
        """
        changes = {k: _as_tuple(v) for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - self.names())
        if unknown:
            raise ValueError(f"{type(self).__name__} has no setting {unknown}; its settings are {sorted(self.names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict for checkpoints (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "VolumeConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        unknown = sorted(set(values) - cls.names())
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(cls.names())}")
        return cls(**{k: _as_tuple(v) for k, v in values.items()})

    @classmethod
    def names(cls) -> set[str]:
        """The settings' names."""
        return {f.name for f in dataclasses.fields(cls)}

    @staticmethod
    def check_hu_window(hu_window: Sequence[float]) -> None:
        """Refuse a window that is not (min, max) with min < max."""
        low, high = hu_window
        if not low < high:
            raise ValueError(f"hu_window must be (min, max) with min < max, got {tuple(hu_window)}")


@dataclass(frozen=True)
class SegConfig(VolumeConfig):
    """Pre-processing and inference settings of a segmentation task (stored in checkpoints).

    Attributes:
        spacing: target voxel size (x, y, z) in mm after orientation.
        roi_size: training crop and sliding-window size (x, y, z) in voxels.
        hu_window: (min, max) HU; intensities are clipped to it and scaled to [0, 1].
        orientation: axis codes of the working grid, e.g. ``"RAS"``.
        overlap: sliding-window overlap, one value or one per axis.
        sw_batch_size: windows per network call.
        crop_region: where the windows run, the rest being background: ``"body"`` (bounding box of
            the voxels above ``body_threshold_hu``), ``"lung"`` (box of the darker voxels enclosed
            by the body outline in each axial slice: lungs and airways) or ``"none"``.
        body_threshold_hu: HU above which a voxel counts as body for ``crop_region``.
        crop_margin: voxels added around the box on each side.
        blend_mode: how overlapping windows are blended: ``"gaussian"`` (weights falling off towards
            the window border, less sensitive to where windows fall) or ``"constant"`` (a plain mean,
            MONAI's default, for outputs comparable with ``sliding_window_inference``).
        strict_hu: refuse (instead of warn about) volumes that do not look like HU.
        fill_nan: HU value that replaces NaN and infinite image voxels; None (the default) refuses
            such volumes.
    """

    spacing: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    hu_window: tuple[float, float]
    orientation: str = "RAS"
    overlap: float | tuple[float, float, float] = 0.25
    sw_batch_size: int = 4
    crop_region: str = "body"
    body_threshold_hu: float = -500.0
    crop_margin: int = 8
    blend_mode: str = "gaussian"
    strict_hu: bool = False
    fill_nan: float | None = None

    def __post_init__(self) -> None:
        _check_triple("spacing", self.spacing, float, positive=True)
        _check_triple("roi_size", self.roi_size, int, positive=True)
        self.check_hu_window(self.hu_window)
        overlaps = self.overlap if isinstance(self.overlap, (tuple, list)) else (self.overlap,)
        if not all(0.0 <= o < 1.0 for o in overlaps):
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        if self.crop_region not in CROP_REGIONS:
            raise ValueError(f"crop_region must be one of {CROP_REGIONS}, got {self.crop_region!r}")
        if self.blend_mode not in BLEND_MODES:
            raise ValueError(f"blend_mode must be one of {BLEND_MODES}, got {self.blend_mode!r}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if self.fill_nan is not None and not np.isfinite(self.fill_nan):
            raise ValueError(f"fill_nan must be a finite HU value, got {self.fill_nan}")


def hu_to_unit(config: VolumeConfig, hu: float) -> float:
    """The value that ``hu`` takes after windowing to ``config.hu_window`` and scaling to [0, 1]."""
    low, high = config.hu_window
    return float(min(max((hu - low) / (high - low), 0.0), 1.0))


def _check_triple(name: str, values: Sequence, kind: type, *, positive: bool) -> None:
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{name} must be three numbers (x, y, z), got {values}")
    if kind is int and not all(float(v).is_integer() for v in values):
        raise ValueError(f"{name} must be integers, got {values}")
    if positive and not all(v > 0 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
