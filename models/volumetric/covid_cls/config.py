"""Settings of the COVID-19 classifier (stored in checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass

from models.volumetric.config import VolumeConfig


@dataclass(frozen=True)
class ClsConfig(VolumeConfig):
    """Pre-processing settings of the classifier (stored in checkpoints).

    Attributes:
        roi_size: network input size (x, y, z) in voxels after the lung crop; every side >= 32
            (DenseNet121 halves the grid five times).
        hu_window: (min, max) HU; intensities are clipped to it and scaled to [0, 1].
        crop_margin: voxels kept around the lung's bounding box on each side, per axis.
        mask_intensity: set the voxels outside the lung mask to zero before cropping. On by default:
            trained from scratch on the phantom's 12 scans, the unmasked network stayed at its class
            prior (the released Clara model was trained unmasked, from a larger set). A masked model
            follows the mask's boundary closely: trained on reference masks, it scores lower on
            lung_seg's (the README's known limit).
        orientation: axis codes of the working grid.
        threshold: probability at or above which a case is called COVID-19.
        strict_hu: refuse (instead of warn about) volumes that do not look like HU.
    """

    roi_size: tuple[int, int, int] = (192, 192, 64)
    hu_window: tuple[float, float] = (-1000.0, 500.0)
    crop_margin: tuple[int, int, int] = (10, 10, 2)
    mask_intensity: bool = True
    orientation: str = "RAS"
    threshold: float = 0.5
    strict_hu: bool = False

    def __post_init__(self) -> None:
        if len(self.roi_size) != 3 or min(self.roi_size) < 32:
            raise ValueError(f"roi_size must be three sides >= 32 for DenseNet121, got {tuple(self.roi_size)}")
        if len(self.crop_margin) != 3 or min(self.crop_margin) < 0:
            raise ValueError(f"crop_margin must be three non-negative voxel counts, got {tuple(self.crop_margin)}")
        self.check_hu_window(self.hu_window)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")
