"""The scan of one analysis: read from a file or folder, or taken from an array, as a HU volume."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.conventions import LUNG_WINDOW
from datasets.io import NotHUError, Volume, check_finite, check_hu, read_volume, write_nifti
from datasets.png_stack import read_png_stack

PNG_SPACING = (0.7, 0.7, 5.0)  # default column, row and slice spacing (mm) of a folder of slice pictures
SCAN_FILE = "scan.nii.gz"  # the scan as the 3D models read it, when the input is not such a file


@dataclass
class Scan:
    """A scan ready for the pipeline.

    Attributes:
        volume: the HU volume (``array`` Float32[X, Y, Z], ``affine`` Float64[4, 4]).
        image_path: a file the 3D models read: the input itself, or ``scan.nii.gz`` in the output folder.
        assumed: what the analysis assumed (slice pictures' window and spacing, ``fill_nan``), or None.
        source: the input, as the report names it.
        read_warnings: (category, message) of the warnings raised while it was read, when it was read
            apart from its analysis (a cohort's reader process); :func:`models.analysis.analyze` raises
            them again so that its report lists them.
    """

    volume: Volume
    image_path: Path
    assumed: dict | None
    source: str
    read_warnings: tuple[tuple[type[Warning], str], ...] = ()

    def warn_again(self) -> None:
        """Raise the warnings of its reading again (in the process that analyses it)."""
        for category, message in self.read_warnings:
            warnings.warn(message, category, stacklevel=2)


def read_scan(scan: str | os.PathLike | np.ndarray | Volume, *, out_dir: str | os.PathLike,
              png_window: tuple[float, float] = LUNG_WINDOW, png_spacing: tuple[float, float, float] = PNG_SPACING,
              affine: np.ndarray | None = None, allow_non_hu: bool = False, fill_nan: float | None = None) -> Scan:
    """The scan as a HU volume and a file the 3D models can read.

    Args:
        scan: NIfTI file, DICOM folder, folder of slice pictures, a :class:`Volume`, or Float[X, Y, Z] HU.
        out_dir: output folder, for ``scan.nii.gz`` (written for slice pictures, arrays, volumes and
            ``fill_nan``).
        png_window: HU that grey 0 and 255 of slice pictures stand for (see :func:`read_png_stack`).
        png_spacing: column, row and slice spacing of slice pictures in mm.
        affine: Float64[4, 4] voxel -> RAS+ mm of an array ``scan`` (required for one).
        allow_non_hu: warn about intensities that do not look like HU instead of refusing them.
        fill_nan: HU value for NaN and infinite voxels; None refuses them.

    Raises:
        FileNotFoundError, ValueError: naming the input when it is missing, unreadable, not in HU
            (unless ``allow_non_hu``) or holds NaN voxels (unless ``fill_nan``).
    """
    out_dir = Path(out_dir)
    if isinstance(scan, (np.ndarray, Volume)):
        return _from_memory(scan, out_dir=out_dir, affine=affine, allow_non_hu=allow_non_hu, fill_nan=fill_nan)
    path = Path(scan)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir() and not any(f.suffix.lower() == ".dcm" or is_dicom(f) for f in path.iterdir() if f.is_file()):
        volume = read_png_stack(path, window=png_window, spacing=png_spacing)
        assumed = {"png_window_hu": list(png_window), "png_spacing_mm": list(png_spacing)}
        return Scan(volume, write_nifti(volume, out_dir / SCAN_FILE), assumed, str(scan))
    try:
        volume = read_volume(path, strict_hu=not allow_non_hu, fill_nan=fill_nan)
    except NotHUError as err:
        raise NotHUError(f"{err}; lesion types and volumes would be wrong (--allow_non_hu analyses it anyway)") from err
    if fill_nan is None:
        return Scan(volume, path, None, str(scan))
    # the models read the filled volume
    return Scan(volume, write_nifti(volume, out_dir / SCAN_FILE), {"fill_nan_hu": fill_nan}, str(scan))


def _from_memory(scan: np.ndarray | Volume, *, out_dir: Path, affine: np.ndarray | None, allow_non_hu: bool,
                 fill_nan: float | None) -> Scan:
    """A scan given as a :class:`Volume` or an array, checked as a file would be and written as ``scan.nii.gz``."""
    if isinstance(scan, np.ndarray):
        if affine is None:
            raise ValueError("an array scan needs its affine (Float64[4, 4], voxel -> RAS+ mm)")
        affine = np.asarray(affine, np.float64)
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        scan = Volume(np.asarray(scan, np.float32), affine, spacing, source="<array>")
    if scan.array.ndim != 3:
        raise ValueError(f"{scan.source}: expected a 3D volume [X, Y, Z], got shape {scan.array.shape}")
    try:
        check_hu(scan.array, scan.source, strict=not allow_non_hu)
    except NotHUError as err:
        raise NotHUError(f"{err}; lesion types and volumes would be wrong (allow_non_hu analyses it anyway)") from err
    array = check_finite(scan.array, scan.source, fill_nan=fill_nan)
    volume = Volume(array, scan.affine, scan.spacing, scan.source, scan.series_uid, scan.description)
    assumed = {"fill_nan_hu": fill_nan} if array is not scan.array else None
    return Scan(volume, write_nifti(volume, out_dir / SCAN_FILE), assumed, scan.source)


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file (its preamble is followed by ``DICM``)."""
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"
