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
        mask_erosion_mm: with ``mask_intensity``, the lung mask is first shrunk by this distance
            (voxels nearer than it to the outside of the mask are dropped; mm on the scan's grid).
            A predicted lung mask strays by a voxel or two into the chest wall; the bright rim it adds
            reads as peripheral opacity to a model trained on reference masks, and with 1.5 mm taken
            off both kinds of mask agree (README). 0 keeps the mask as it is; checkpoints from before
            this setting existed load with 0.
        orientation: axis codes of the working grid.
        threshold: probability at or above which a case is called COVID-19.
        strict_hu: refuse (instead of warn about) volumes that do not look like HU.
    """

    roi_size: tuple[int, int, int] = (192, 192, 64)
    hu_window: tuple[float, float] = (-1000.0, 500.0)
    crop_margin: tuple[int, int, int] = (10, 10, 2)
    mask_intensity: bool = True
    mask_erosion_mm: float = 1.5
    orientation: str = "RAS"
    threshold: float = 0.5
    strict_hu: bool = False

    def __post_init__(self) -> None:
        if len(self.roi_size) != 3 or min(self.roi_size) < 32:
            raise ValueError(f"roi_size must be three sides >= 32 for DenseNet121, got {tuple(self.roi_size)}")
        if len(self.crop_margin) != 3 or min(self.crop_margin) < 0:
            raise ValueError(f"crop_margin must be three non-negative voxel counts, got {tuple(self.crop_margin)}")
        self.check_hu_window(self.hu_window)
        if not self.mask_erosion_mm >= 0:
            raise ValueError(f"mask_erosion_mm must be >= 0, got {self.mask_erosion_mm}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")

    @classmethod
    def from_dict(cls, values: dict) -> "ClsConfig":
        """As :meth:`VolumeConfig.from_dict`; a stored config without ``mask_erosion_mm`` (older
        checkpoints) keeps the mask as it was trained, unshrunk."""
        return super().from_dict({"mask_erosion_mm": 0.0, **values})
