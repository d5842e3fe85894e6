"""CT readers and writers shared by both tracks: PNG/JPG slices, NIfTI and DICOM volumes.

Geometry convention for volumes (the one nibabel uses):

* ``Volume.array`` is indexed ``[i, j, k]`` = ``[X, Y, Z]``. For DICOM, ``i`` is the column index
  of a slice's ``pixel_array`` (along the row direction cosine, ``IOP[0:3]``), ``j`` the row index
  (along the column direction cosine, ``IOP[3:6]``), ``k`` the slice, sorted by the position of
  ``ImagePositionPatient`` on the slice normal ``IOP[0:3] x IOP[3:6]``. So
  ``array[:, :, k] == pixel_array_k.T`` (rescaled to HU).
* ``Volume.affine`` maps voxel ``(i, j, k, 1)`` to RAS+ world millimetres (nibabel). DICOM world
  coordinates are LPS, so the DICOM affine ``[row*dc | col*dr | step | IPP_0]`` is flipped with
  ``diag(-1, -1, 1, 1)``. Voxel (0, 0, 0) is the centre of the first transmitted pixel of the first
  slice, i.e. its world position is ``IPP_0`` with x and y negated.
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.paths import refuse_overwriting_inputs

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_GAP_TOLERANCE = 0.05  # relative deviation from the median gap that counts as a missing slice
_INT16 = np.iinfo(np.int16)
_MAX_LISTED = 10


class NotHUWarning(UserWarning):
    """Intensities of a volume do not look like Hounsfield units."""


class NotHUError(ValueError):
    """Intensities of a volume do not look like Hounsfield units (the strict form of NotHUWarning)."""


class NonFiniteWarning(UserWarning):
    """NaN or infinite voxels of a volume were replaced by a fill value."""


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its geometry.

    Attributes:
        array: Float32[X, Y, Z] intensities in HU.
        affine: Float64[4, 4] voxel (i, j, k) -> RAS+ world mm (nibabel convention).
        spacing: voxel size in mm along i, j, k.
        source: file or folder it came from.
        series_uid: DICOM SeriesInstanceUID, None for NIfTI.
        description: DICOM SeriesDescription, when present.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    series_uid: str | None = None
    description: str | None = None

    @property
    def name(self) -> str:
        """A readable identifier: the source, with the series UID for DICOM."""
        return f"{self.source} (series {self.series_uid})" if self.series_uid else self.source


# ----------------------------------------------------------------------------------------- images
def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG/JPG slice as 8-bit grayscale.

    Args:
        path: image file. RGB/RGBA/palette images are converted to gray (ITU-R 601 luma);
            16-bit images are accepted when their values fit in 0..255.

    Returns:
        UInt8[H, W] array.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file when it is corrupt, unreadable or not 8-bit.
    """
    image = _open_image(path)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return _to_uint8(np.asarray(image), path)
    return np.array(image.convert("L"), dtype=np.uint8)  # a writable copy


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label PNG keeping its stored values (palette images give their indices).

    Returns:
        UInt8[H, W] array of label values.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file when it is corrupt, or colour with channels that differ.
    """
    image = _open_image(path)
    if image.mode in ("L", "P"):
        return np.array(image, dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 3:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(3, array.shape[2]))):
            raise ValueError(f"{path}: colour mask with channels that differ; expected one label value per pixel")
        array = array[..., 0]
    return _to_uint8(array, path)


def _open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: cannot read image, the file is corrupt or not an image ({err})") from err
    return image


def _to_uint8(array: np.ndarray, path: str | Path) -> np.ndarray:
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: values span [{array.min()}, {array.max()}]; expected an 8-bit image (0..255)")
    return array.astype(np.uint8)


# ------------------------------------------------------------------------------------- HU check
def check_hu(array: np.ndarray, name: str, *, strict: bool = False) -> None:
    """Warn (or raise) when intensities do not look like Hounsfield units.

    A CT scan holds air at about -1000 HU. Not HU: values in [0, 1] (normalised), in [0, 255]
    (an 8-bit image), or with no value below -500 and none above 4095 (raw scanner values, the
    DICOM RescaleSlope/RescaleIntercept not applied).

    Args:
        array: intensities, any shape.
        name: the case, named in the message.
        strict: raise instead of warning.

    Raises:
        NotHUError: when ``strict`` and the intensities are not HU.
        ValueError: when the array is empty.
    """
    reason = _not_hu_reason(np.asarray(array), name)
    if reason is None:
        return
    message = f"{name}: intensities do not look like Hounsfield units: {reason}"
    if strict:
        raise NotHUError(message)
    warnings.warn(message, NotHUWarning, stacklevel=2)


def _not_hu_reason(array: np.ndarray, name: str) -> str | None:
    if array.size == 0:
        raise ValueError(f"{name}: empty volume")
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    span = f"values span [{low:g}, {high:g}]"
    if low >= 0 and high <= 1:
        return f"{span}, a normalised image; air is about -1000 HU"
    if low >= 0 and high <= 255:
        return f"{span}, an 8-bit image; air is about -1000 HU"
    if low >= -500 and high <= 4095:
        return (f"{span} with nothing below -500 (air is about -1000 HU): raw scanner values, "
                "RescaleSlope/RescaleIntercept probably not applied")
    return None


# --------------------------------------------------------------------------------- finite values
def check_finite(array: np.ndarray, name: str, *, fill_nan: float | None = None) -> np.ndarray:
    """Refuse NaN and infinite voxels, or replace them by ``fill_nan`` (with a NonFiniteWarning).

    A scan with NaN voxels is damaged: segmenting it gives empty masks and 0 mL without an error,
    so the default is to refuse it.

    Args:
        array: Float[...] intensities.
        name: the file or case, named in the message.
        fill_nan: HU value for NaN and infinite voxels (e.g. -1000, air); None refuses them.

    Returns:
        ``array`` itself when every value is finite, else a filled copy.

    Raises:
        ValueError: naming ``name`` and the count of such voxels, when ``fill_nan`` is None or no
            voxel at all is finite.
    """
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count == 0:
        return array
    message = f"{name}: {count} of {array.size} voxels are NaN or infinite"
    if count == array.size:
        raise ValueError(f"{message}; the volume holds no value")
    if fill_nan is None:
        raise ValueError(f"{message}; repair the file, or replace them with a HU value (--fill_nan HU, "
                         "e.g. -1000 for air)")
    warnings.warn(f"{message}; replaced by {fill_nan:g} HU", NonFiniteWarning, stacklevel=2)
    return np.where(bad, array.dtype.type(fill_nan), array)


# ------------------------------------------------------------------------------------------ NIfTI
def read_nifti(path: str | Path, *, strict_hu: bool = False, fill_nan: float | None = None) -> Volume:
    """Read a 3D NIfTI volume (scaling applied) with its affine.

    Args:
        path: ``.nii`` or ``.nii.gz`` file; 4D files are accepted when the 4th axis has size 1.
        strict_hu: raise instead of warning when intensities are not HU (see :func:`check_hu`).
        fill_nan: HU value for NaN and infinite voxels; None refuses them (see :func:`check_finite`).

    Returns:
        The :class:`Volume` (array Float32[X, Y, Z], nibabel's best affine).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file when it is empty, unreadable, not a 3D volume or holds NaN or
            infinite voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); the NIfTI file is corrupt or was not fully written")
    try:
        image = nib.load(str(path))
        array = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types for a corrupt file
        raise ValueError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from err
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: a volume must be 3D [X, Y, Z], got a {array.ndim}D array of shape {array.shape}")
    array = check_finite(array, str(path), fill_nan=fill_nan)
    volume = Volume(array, np.asarray(image.affine, dtype=np.float64), _spacing(image.affine), str(path))
    check_hu(array, str(path), strict=strict_hu)
    return volume


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write a volume as NIfTI: label maps (uint8 or bool) as uint8, other integers in range as int16,
    anything else as float32.

    Args:
        volume: the volume; its affine becomes both qform and sform (code 1, scanner).
        path: ``.nii`` or ``.nii.gz`` file; parent folders are created.

    Returns:
        The written path.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name ends with .nii or .nii.gz")
    array = np.asarray(volume.array)
    image = nib.Nifti1Image(_storage(array), volume.affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _storage(array: np.ndarray) -> np.ndarray:
    """The array in the dtype it is stored as: uint8 labels, int16 integers, float32 otherwise."""
    if array.dtype in (np.uint8, np.bool_):
        return array.astype(np.uint8)
    return array.astype(np.int16) if _fits_int16(array) else array.astype(np.float32)


def _fits_int16(array: np.ndarray) -> bool:
    """True when every value is a finite integer within the int16 range."""
    if array.size == 0 or not np.all(np.isfinite(array)):
        return False
    return bool(np.array_equal(array, np.round(array)) and array.min() >= _INT16.min and array.max() <= _INT16.max)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


# ------------------------------------------------------------------------------------------ DICOM
def read_dicom_series(folder: str | Path, *, recursive: bool = False, strict_hu: bool = False,
                      fill_nan: float | None = None) -> list[Volume]:
    """Read every DICOM image series of a folder, one volume per SeriesInstanceUID.

    Files that are not DICOM, and DICOM files without pixel data, are skipped. Slices are ordered
    by ImagePositionPatient along the slice normal; RescaleSlope/RescaleIntercept give HU.

    Args:
        folder: folder of DICOM files.
        recursive: also read files in sub-folders.
        strict_hu: raise instead of warning when intensities are not HU (see :func:`check_hu`).
        fill_nan: HU value for NaN and infinite voxels; None refuses them (see :func:`check_finite`).

    Returns:
        Volumes (array Float32[X, Y, Z] in HU, RAS affine), sorted by series UID.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: naming the folder when it holds no DICOM image; naming the series and files
            for a missing slice (uneven gaps), duplicate positions, or slices of different size,
            spacing or orientation within one series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder not found: {folder}")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    slices = [s for s in (_read_dicom_file(p) for p in files) if s is not None]
    if not slices:
        what = f"none of its {len(files)} files is a DICOM image" if files else "the folder is empty"
        raise ValueError(f"no DICOM image found in {folder}: {what}")
    return _volumes_from_slices(slices, str(folder), strict_hu=strict_hu, fill_nan=fill_nan)


def read_volume(path: str | Path, *, strict_hu: bool = False, fill_nan: float | None = None) -> Volume:
    """Read a NIfTI file, a DICOM folder holding exactly one series, or a single DICOM file.

    Args:
        path: the file or folder.
        strict_hu: raise instead of warning when intensities are not HU (see :func:`check_hu`).
        fill_nan: HU value for NaN and infinite voxels; None refuses them (see :func:`check_finite`).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: several series in the folder (listing their UIDs), or as the readers do.
    """
    path = Path(path)
    if path.is_dir():
        volumes = read_dicom_series(path, strict_hu=strict_hu, fill_nan=fill_nan)
        if len(volumes) > 1:
            uids = ", ".join(str(v.series_uid) for v in volumes)
            raise ValueError(f"{path}: {len(volumes)} DICOM series in one folder ({uids}); "
                             "convert them with convert_dicom.py and pick one")
        return volumes[0]
    if path.name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path, strict_hu=strict_hu, fill_nan=fill_nan)
    if not path.is_file():
        raise FileNotFoundError(f"volume not found: {path}")
    dicom = _read_dicom_file(path)
    if dicom is None:
        raise ValueError(f"{path}: neither NIfTI (.nii, .nii.gz) nor a DICOM image file")
    return _volumes_from_slices([dicom], str(path), strict_hu=strict_hu, fill_nan=fill_nan)[0]


def convert_dicom_folder(in_dir: str | Path, out_dir: str | Path, *, recursive: bool = False,
                         overwrite: bool = False) -> list[Path]:
    """Convert every DICOM series of a folder to ``.nii.gz`` in HU, one file per SeriesInstanceUID.

    Every series is read and checked before anything is written. File names come from the
    SeriesDescription (else the UID), sanitised; the UID is appended when two names clash.

    Args:
        in_dir: folder of DICOM files.
        out_dir: output folder (created).
        recursive: also read sub-folders of ``in_dir``.
        overwrite: replace existing output files.

    Returns:
        The written paths, in series-UID order.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False.
        ValueError: ``out_dir`` is ``in_dir`` or inside it; or as :func:`read_dicom_series`.
        FileNotFoundError: as :func:`read_dicom_series`.
    """
    refuse_overwriting_inputs([in_dir], [out_dir])
    volumes = read_dicom_series(in_dir, recursive=recursive)
    paths = [Path(out_dir) / f"{stem}.nii.gz" for stem in series_file_stems(volumes)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output files exist (pass overwrite=True to replace them): {', '.join(existing)}")
    return [write_nifti(volume, path) for volume, path in zip(volumes, paths)]


def series_file_stems(volumes: list[Volume]) -> list[str]:
    """File stems for series: sanitised SeriesDescription or UID, with the UID when names clash."""
    stems = [_sanitize(v.description or v.series_uid or f"series_{i}") for i, v in enumerate(volumes)]
    clashes = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{_sanitize(v.series_uid or str(i))}" if s in clashes else s
            for i, (s, v) in enumerate(zip(stems, volumes))]


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("._")[:120] or "series"


@dataclass
class _DicomSlice:
    path: Path
    dataset: object  # pydicom.Dataset


def _read_dicom_file(path: Path) -> _DicomSlice | None:
    """A DICOM image file, or None when the file is not DICOM or holds no pixel data."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(str(path))
    except InvalidDicomError:
        return None
    except Exception as err:  # truncated or corrupt DICOM
        raise ValueError(f"{path}: corrupt DICOM file ({type(err).__name__}: {err})") from err
    return _DicomSlice(path, dataset) if "PixelData" in dataset else None


def _volumes_from_slices(slices: list[_DicomSlice], source: str, *, strict_hu: bool,
                         fill_nan: float | None) -> list[Volume]:
    groups: dict[str, list[_DicomSlice]] = defaultdict(list)
    for s in slices:
        groups[str(s.dataset.get("SeriesInstanceUID", "")) or ""].append(s)
    return [_series_volume(groups[uid], uid or None, source, strict_hu=strict_hu, fill_nan=fill_nan)
            for uid in sorted(groups)]


def _series_volume(slices: list[_DicomSlice], uid: str | None, source: str, *, strict_hu: bool,
                   fill_nan: float | None) -> Volume:
    label = f"{source}: series {uid}"
    geometry = _common_geometry(slices, label)
    row, col = geometry["iop"][:3], geometry["iop"][3:]
    normal = np.cross(row, col)
    slices = sorted(slices, key=lambda s: float(np.dot(_ipp(s), normal)))
    positions = np.array([_ipp(s) for s in slices])
    step = _slice_step(slices, positions, normal, label)
    row_spacing, col_spacing = geometry["spacing"]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row * col_spacing  # i: column index, along the row direction
    affine_lps[:3, 1] = col * row_spacing  # j: row index, along the column direction
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ affine_lps
    array = np.stack([_slice_hu(s, label).T for s in slices], axis=2)  # [X, Y, Z]
    array = check_finite(array, label, fill_nan=fill_nan)
    description = str(slices[0].dataset.get("SeriesDescription", "") or "") or None
    volume = Volume(array, affine, _spacing(affine), source, uid, description)
    check_hu(array, volume.name, strict=strict_hu)
    return volume


def _common_geometry(slices: list[_DicomSlice], label: str) -> dict:
    """Size, pixel spacing and orientation shared by every slice; an error names the odd files."""
    geometries = [_geometry(s, label) for s in slices]
    for key, what in (("size", "Rows x Columns"), ("spacing", "PixelSpacing"), ("iop", "ImageOrientationPatient")):
        values = [_fmt(g[key]) for g in geometries]
        common = max(set(values), key=values.count)
        odd = [s.path.name for s, v in zip(slices, values) if v != common]
        if odd:
            other = next(v for v in values if v != common)
            raise ValueError(f"{label}: mixed series, {what} of {', '.join(odd[:_MAX_LISTED])} is {other} but "
                             f"{values.count(common)} other slice(s) have {common}")
    return geometries[0]


def _geometry(s: _DicomSlice, label: str) -> dict:
    ds = s.dataset
    missing = [k for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
               if k not in ds]
    if missing:
        raise ValueError(f"{label}: {s.path.name} lacks {', '.join(missing)}; cannot place the slice in space")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{label}: {s.path.name} is a multi-frame image; only one slice per file is supported")
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    iop[:3] /= np.linalg.norm(iop[:3])
    iop[3:] /= np.linalg.norm(iop[3:])
    return {"size": (int(ds.Rows), int(ds.Columns)), "spacing": tuple(float(v) for v in ds.PixelSpacing), "iop": iop}


def _ipp(s: _DicomSlice) -> np.ndarray:
    return np.asarray([float(v) for v in s.dataset.ImagePositionPatient])


def _slice_step(slices: list[_DicomSlice], positions: np.ndarray, normal: np.ndarray, label: str) -> np.ndarray:
    """LPS vector from one slice to the next; checks for duplicate positions and missing slices."""
    if len(slices) == 1:
        ds = slices[0].dataset
        thickness = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
        return normal * abs(thickness)
    gaps = np.diff(positions @ normal)
    for i, gap in enumerate(gaps):
        if gap < 1e-3:
            raise ValueError(f"{label}: {slices[i].path.name} and {slices[i + 1].path.name} have the same "
                             "position; duplicate slices or several acquisitions in one series")
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > SLICE_GAP_TOLERANCE * median:
        raise ValueError(f"{label}: incomplete series, uneven slice gaps ({gaps.min():.4g} to {gaps.max():.4g} mm, "
                         f"median {median:.4g} mm); a slice is probably missing between "
                         f"{slices[worst].path.name} and {slices[worst + 1].path.name}")
    return (positions[-1] - positions[0]) / (len(slices) - 1)


def _slice_hu(s: _DicomSlice, label: str) -> np.ndarray:
    ds = s.dataset
    try:
        pixels = ds.pixel_array
    except Exception as err:  # missing codec, truncated pixel data
        raise ValueError(f"{label}: cannot decode the pixels of {s.path.name} ({type(err).__name__}: {err})") from err
    if pixels.ndim != 2:
        raise ValueError(f"{label}: {s.path.name} has pixel array of shape {pixels.shape}; expected one gray slice")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _fmt(value) -> str:
    """Geometry value as text, rounded so that float noise (and -0.0) compares equal."""
    if all(isinstance(v, int) for v in value):
        return "x".join(str(v) for v in value)
    return str((np.round(np.asarray(value, dtype=float), 4) + 0.0).tolist())
