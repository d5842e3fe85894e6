"""Volume loading shared by the volumetric tasks: dictionary keys, datalists, the checked loader.

Volumes flow as MONAI dictionaries ``{"image": path, "label": path}``; after a task's
pre-processing, ``image`` is a MetaTensor Float[1, X, Y, Z] scaled to [0, 1] on the task's grid
(orientation and spacing) and ``label`` a MetaTensor Float[1, X, Y, Z]. A task itself (its network,
transforms, loss and stages) is one :class:`models.volumetric.task.Task`; see
docs/ARCHITECTURE.md for how the pieces fit.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import ImageReader
from monai.transforms import EnsureChannelFirstd, LoadImage, MapTransform

from datasets.io import NotHUWarning, check_finite, check_hu, read_volume
from datasets.volumes import load_datalist

IMAGE_KEY, LABEL_KEY = "image", "label"
# Datalist sections, named once. MSD writes training/test, Clara training/validation/testing; a section
# is read under any of its names, the first one the file has.
TRAINING, VALIDATION, TEST = "training", "validation", "test"
SECTION_NAMES = {TRAINING: (TRAINING,), VALIDATION: (VALIDATION,), TEST: (TEST, "testing")}
# Messages of optional MONAI DICOM back ends that are not installed; harmless, so kept quiet.
_QUIET_READER_WARNINGS = ("NvImgCodecPydicomReader.*",)
# Logged by MONAI each time a loader is built (once per LoadVolumed, so several times a run). DICOM is
# read by DicomSeriesReader here, never by MONAI's nvImageCodec reader, so the message does not apply.
_QUIET_LOG = ("monai.data.nvimgcodec_pydicom_plugin", "nvImageCodec is not available")


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


logging.getLogger(_QUIET_LOG[0]).addFilter(_DropMessage(_QUIET_LOG[1]))


class DicomSeriesReader(ImageReader):
    """MONAI image reader for DICOM (a series folder or one file) through ``datasets.io.read_volume``.

    Slices are ordered by ImagePositionPatient and RescaleSlope/Intercept applied, exactly as
    convert_dicom.py does, so a DICOM input and its converted NIfTI give the same array and affine.

    Args:
        fill_nan: HU value for NaN and infinite voxels; None refuses them.
    """

    def __init__(self, fill_nan: float | None = None):
        super().__init__()
        self.fill_nan = fill_nan

    def verify_suffix(self, filename) -> bool:
        paths = filename if isinstance(filename, (list, tuple)) else [filename]
        return len(paths) == 1 and (Path(paths[0]).is_dir() or str(paths[0]).lower().endswith(".dcm"))

    def read(self, data, **kwargs):
        if not self.verify_suffix(data):
            raise ValueError(f"{data}: not a DICOM folder or .dcm file")
        path = data[0] if isinstance(data, (list, tuple)) else data
        with warnings.catch_warnings():  # LoadVolumed checks HU itself, naming the case
            warnings.simplefilter("ignore", NotHUWarning)
            return read_volume(path, fill_nan=self.fill_nan)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Float32[X, Y, Z] HU and MONAI metadata (RAS affine)."""
        affine = np.asarray(img.affine, dtype=np.float64)
        meta = {"affine": affine, "original_affine": affine.copy(), "spatial_shape": np.asarray(img.array.shape),
                "original_channel_dim": "no_channel", "space": "RAS"}
        return np.asarray(img.array, dtype=np.float32), meta


class LoadVolumed(MapTransform):
    """MONAI ``LoadImage`` for each key + ``EnsureChannelFirstd``, with the project's checks on each case.

    DICOM (a folder or a .dcm file) is read by :class:`DicomSeriesReader`, anything else by the
    MONAI reader its suffix selects (nibabel for NIfTI); a reader's own error is reported, not those
    of readers that were never meant for the file.

    Checks: each key holds a file path (not a class number), the file exists and is not empty,
    it is readable, the image is a 3D volume (not a 2D slice or a 4D series), no voxel is NaN or
    infinite (unless ``fill_nan``), the image's intensities look like HU
    (``datasets.io.check_hu``), and image and label have the same shape. Every message names the
    case. Output: MetaTensor[1, X, Y, Z] per key, on the file's own grid.

    Args:
        keys: the volume keys to load.
        strict_hu: refuse, instead of warning about, an image that does not look like HU.
        fill_nan: HU value for NaN and infinite image voxels (labels are always refused); None
            refuses them.
        allow_missing_keys: skip keys a case does not have.
    """

    def __init__(self, keys: Sequence[str], *, strict_hu: bool = False, fill_nan: float | None = None,
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        with warnings.catch_warnings():
            for message in _QUIET_READER_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            self.loader = LoadImage(image_only=True)
        self.dicom = DicomSeriesReader(fill_nan=fill_nan)
        self.channel_first = EnsureChannelFirstd(keys, channel_dim="no_channel", allow_missing_keys=allow_missing_keys)
        self.strict_hu, self.fill_nan = strict_hu, fill_nan

    def __call__(self, data: dict) -> dict:
        name = case_name(data)
        out = dict(data)
        for key in self.key_iterator(data):
            out[key] = self._load(data[key], name, key)
        out = self.channel_first(out)
        for key in self.key_iterator(out):
            _check_3d(out[key], name, key, data[key])
            _check_finite(out[key], f"case {name}: {key} {data[key]}", self.fill_nan if key == IMAGE_KEY else None)
        _check_same_shape(out, name, data)
        if IMAGE_KEY in out:
            check_hu(np.asarray(out[IMAGE_KEY][0]), f"case {name} ({data[IMAGE_KEY]})", strict=self.strict_hu)
        return out

    def _load(self, source: Any, name: str, key: str) -> torch.Tensor:
        """One volume with MONAI metadata, after checking that ``source`` is a file worth reading."""
        _check_source(source, name, key)
        reader = self.dicom if self.dicom.verify_suffix(str(source)) else None
        try:
            return self.loader(str(source), reader=reader)
        except Exception as err:  # readers raise many types; the cause is kept
            raise ValueError(f"case {name}: cannot read {key} {source} as a volume ({_root_message(err)})") from err


def _check_source(source: Any, name: str, key: str) -> None:
    """Refuse a key that holds no file path, a missing path, an empty file or an empty folder."""
    if isinstance(source, (int, float)) and not isinstance(source, bool) and key == LABEL_KEY:
        raise ValueError(f"case {name}: 'label' is {source!r}, a class number, not a label volume; this is a "
                         "classification datalist (entries {'image', 'label_image', 'label': class}), and this "
                         "task needs a segmentation datalist whose 'label' is a mask file")
    if not isinstance(source, (str, Path)):
        raise ValueError(f"case {name}: '{key}' must be a file path, got {source!r}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"case {name}: {key} file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"case {name}: {key} {path} is an empty file (0 bytes); the file is corrupt or "
                         "was not fully written")
    if path.is_dir() and not any(p.is_file() for p in path.iterdir()):
        raise ValueError(f"case {name}: no DICOM files or volume found in {key} folder {path} (it holds no file)")


def _check_finite(volume: torch.Tensor, label: str, fill_nan: float | None) -> None:
    """Refuse NaN/infinite voxels of a loaded volume, or fill them in place (metadata kept)."""
    values = volume.numpy()  # shares memory with the CPU tensor
    filled = check_finite(values, label, fill_nan=fill_nan)
    if filled is not values:
        values[...] = filled


def case_name(data: dict) -> str:
    """A readable case identifier: the ``case`` field, else the image file's name."""
    if data.get("case"):
        return str(data["case"])
    image = data.get(IMAGE_KEY)
    return Path(str(image)).name if isinstance(image, (str, Path)) else "<in-memory>"


def _check_3d(volume: torch.Tensor, name: str, key: str, source: Any) -> None:
    spatial = tuple(volume.shape[1:])
    if len(spatial) > 3:
        raise ValueError(f"case {name}: {key} {source} is {len(spatial)}D with shape {spatial}; volumetric "
                         "tasks need one 3D volume [X, Y, Z]")
    if len(spatial) != 3 or min(spatial) < 2:
        raise ValueError(f"case {name}: {key} {source} has spatial shape {spatial}, a 2D image; "
                         "volumetric tasks need a 3D volume [X, Y, Z] with at least 2 slices")


def _check_same_shape(out: dict, name: str, data: dict) -> None:
    if IMAGE_KEY in out and LABEL_KEY in out:
        image, label = tuple(out[IMAGE_KEY].shape[1:]), tuple(out[LABEL_KEY].shape[1:])
        if image != label:
            raise ValueError(f"case {name}: image {data[IMAGE_KEY]} has shape {image} but label "
                             f"{data[LABEL_KEY]} has shape {label}; they must be on the same grid")


def load_cases(path: str | Path, *, data_root: str | Path | None = None, section: str = TRAINING) -> list[dict]:
    """Cases of one section of a ``dataset.json`` with absolute paths and a ``case`` name each.

    Args:
        path: the datalist.
        data_root: folder its relative paths start from (default: the datalist's folder).
        section: the section to read, under any of its names (:data:`SECTION_NAMES`: ``test`` and
            ``testing`` are one section).

    Raises:
        FileNotFoundError, ValueError: from the datalist reader, naming the file or case.
    """
    cases = load_datalist(path, data_root=data_root, section=section_in(path, section), check_files=True)
    return [{**c, "case": c.get("case") or case_stem(c[IMAGE_KEY])} for c in cases]


def section_in(path: str | Path, section: str) -> str:
    """The name under which the datalist at ``path`` holds ``section`` (``section`` itself when none)."""
    names = next((n for n in SECTION_NAMES.values() if section in n), (section,))
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return section  # the datalist reader reports the problem, naming the file
    present = [n for n in names if isinstance(document, dict) and n in document]
    return section if section in present or not present else present[0]


def case_stem(path: str | Path) -> str:
    """File name without ``.nii``/``.nii.gz``/``.dcm`` (a DICOM folder keeps its name)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _root_message(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def unwrap_transform_error(err: BaseException) -> BaseException:
    """The first project error (ValueError/FileNotFoundError) under MONAI's "applying transform" wrappers."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, (ValueError, FileNotFoundError)):
            return current
        current = current.__cause__
    return err


def apply_transform(transform: Callable, data: Any) -> Any:
    """``transform(data)``, with the project error under MONAI's "applying transform" wrapper raised instead.

    Raises:
        ValueError, FileNotFoundError: the error a transform raised, naming the case.
    """
    try:
        return transform(data)
    except RuntimeError as err:  # MONAI wraps errors in "applying transform ..."
        raise unwrap_transform_error(err) from err
