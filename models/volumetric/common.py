"""Parts shared by the volumetric tasks: the Task record, the segmentation config, volume loading.

A task module (``lung_seg.py``, ``lesion_seg.py``, ...) defines one :class:`Task`: its network
builder, pre-processing and augmentation (MONAI dictionary transforms), loss, inferer and
post-processing. The scripts look it up with :func:`models.volumetric.get_task` and never branch on
the task's name.

Volumes flow as MONAI dictionaries ``{"image": path, "label": path}``; after pre-processing,
``image`` is a MetaTensor Float[1, X, Y, Z] scaled to [0, 1] on the task's grid (orientation and
spacing) and ``label`` a MetaTensor Float[1, X, Y, Z] with values {0, 1}.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import ImageReader
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    AsDiscreted,
    EnsureChannelFirstd,
    LoadImage,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from datasets.io import check_finite, check_hu

IMAGE_KEY, LABEL_KEY = "image", "label"
CROP_REGIONS = ("body", "lung", "none")
BLEND_MODES = ("gaussian", "constant")
# Any label value above zero is foreground (lung: 1 left / 2 right; lesion: 1 GGO / 2 consolidation).
FOREGROUND_THRESHOLD = 0.5
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


@dataclass(frozen=True)
class SegConfig:
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
        low, high = self.hu_window
        if not low < high:
            raise ValueError(f"hu_window must be (min, max) with min < max, got {tuple(self.hu_window)}")
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

    def replace(self, **changes: Any) -> "SegConfig":
        """A copy with ``changes`` applied (None values are ignored), validated again."""
        changes = {k: _as_tuple(v) for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict for checkpoints (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "SegConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(names)}")
        return cls(**{k: _as_tuple(v) for k, v in values.items()})


@dataclass(frozen=True)
class Task:
    """One volumetric task, defined once.

    Attributes:
        name: registry name, e.g. ``"lung_seg"``.
        kind: ``"segmentation"`` (scripts choose their loops by kind; classification and
            self-supervised tasks add their own kinds).
        builder: dotted path of the keyword-only network builder (stored in checkpoints).
        network_kwargs: default builder keyword arguments.
        default_config: default :class:`SegConfig`.
        roi_multiple: every ROI side must be a multiple of this (network down-sampling).
        preprocessing: ``f(config, *, keys) -> list`` of deterministic dictionary transforms.
        augmentation: ``f(config) -> list`` of training transforms (crops and random ones).
        loss: ``f() -> nn.Module`` taking logits Float[B, C, X, Y, Z] and labels Float[B, 1, X, Y, Z].
        postprocessing: ``f(config) -> callable`` on a label map Int[1, X, Y, Z] (working grid).
        default_lr: default Adam learning rate.
        class_names: output class names, background first.
    """

    name: str
    kind: str
    builder: str
    network_kwargs: dict
    default_config: SegConfig
    roi_multiple: int
    preprocessing: Callable[..., list]
    augmentation: Callable[[SegConfig], list]
    loss: Callable[[], torch.nn.Module]
    postprocessing: Callable[[SegConfig], Callable]
    default_lr: float = 1e-3
    class_names: tuple[str, ...] = field(default=("background", "foreground"))

    def make_config(self, **overrides: Any) -> SegConfig:
        """The default config with ``overrides`` (None values ignored), checked against the network.

        Raises:
            ValueError: when an ROI side is not a multiple of ``roi_multiple``.
        """
        config = self.default_config.replace(**overrides)
        bad = [s for s in config.roi_size if s % self.roi_multiple]
        if bad:
            raise ValueError(f"{self.name}: every roi_size side must be a multiple of {self.roi_multiple} "
                             f"for this network, got {list(config.roi_size)}")
        return config

    def build_network(self, **overrides: Any) -> tuple[torch.nn.Module, dict]:
        """Build the network with the default kwargs updated by ``overrides``; returns (model, kwargs)."""
        from utils.checkpoint import resolve_builder

        kwargs = {**self.network_kwargs, **overrides}
        return resolve_builder(self.builder)(**kwargs), kwargs


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
        from datasets.io import NotHUWarning, read_volume

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


def sliding_window_inferer(config: SegConfig) -> SlidingWindowInferer:
    """MONAI sliding-window inferer with the task's ROI, overlap and blending."""
    return SlidingWindowInferer(roi_size=config.roi_size, sw_batch_size=config.sw_batch_size,
                                overlap=config.overlap, mode=config.blend_mode)


def hu_to_unit(config: SegConfig, hu: float) -> float:
    """The value that ``hu`` takes after windowing and scaling to [0, 1]."""
    low, high = config.hu_window
    return float(min(max((hu - low) / (high - low), 0.0), 1.0))


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


def load_cases(path: str | Path, *, data_root: str | Path | None = None, section: str = "training") -> list[dict]:
    """Cases of one section of a ``dataset.json`` with absolute paths and a ``case`` name each.

    Raises:
        FileNotFoundError, ValueError: from the datalist reader, naming the file or case.
    """
    from datasets.volumes import load_datalist

    cases = load_datalist(path, data_root=data_root, section=section, check_files=True)
    return [{**c, "case": c.get("case") or case_stem(c[IMAGE_KEY])} for c in cases]


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


def _check_triple(name: str, values: Sequence, kind: type, *, positive: bool) -> None:
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{name} must be three numbers (x, y, z), got {values}")
    if kind is int and not all(float(v).is_integer() for v in values):
        raise ValueError(f"{name} must be integers, got {values}")
    if positive and not all(v > 0 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def unwrap_transform_error(err: BaseException) -> BaseException:
    """The first project error (ValueError/FileNotFoundError) under MONAI's "applying transform" wrappers."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, (ValueError, FileNotFoundError)):
            return current
        current = current.__cause__
    return err
