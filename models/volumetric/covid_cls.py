"""Task ``covid_cls``: COVID-19 classification of the lung region with MONAI's 3D DenseNet121.

Input: a CT volume in HU (``image``) and its lung mask (``label_image``); ``label`` is 1 for COVID-19
and 0 otherwise. Pre-processing: orientation RAS, window [-1000, 500] HU scaled to [0, 1], optional
masking of the tissue outside the lung to zero (``mask_intensity``; off by default, as in the released
model, whose config calls it ``disable_mask_intensity``), crop to the lung's bounding box plus a
margin, resize to 192 x 192 x 64. Augmentation: random flips and small rotations. Training: one
logit, BCE-with-logits, Adam 5e-6. Metrics at a 0.5 probability threshold: accuracy, sensitivity,
specificity, and ROC AUC.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.nets import DenseNet121
from monai.transforms import (
    Compose,
    CropForegroundd,
    Invertd,
    MapTransform,
    MaskIntensityd,
    Orientationd,
    RandFlipd,
    RandRotated,
    Resized,
    ScaleIntensityRanged,
)

from models.volumetric.common import IMAGE_KEY, LABEL_KEY, LoadVolumed, Task, case_name, unwrap_transform_error
from models.volumetric.saliency import TARGET_LAYER, explainer_for, save_saliency_outputs
from utils.classification_metrics import confusion_matrix, per_class_rates, roc_auc

MASK_KEY = "label_image"  # the lung mask of a classification case (dataset.json convention)
SALIENCY_KEY = "saliency"
ROTATION_DEGREES = 10.0
CLASS_NAMES = ("non-COVID", "COVID-19")
SELECTION_METRIC = ("auc", True)  # validation metric that selects checkpoint_best.pth (higher is better)


@dataclass(frozen=True)
class ClsConfig:
    """Pre-processing settings of the classifier (stored in checkpoints).

    Attributes:
        roi_size: network input size (x, y, z) in voxels after the lung crop; every side >= 32
            (DenseNet121 halves the grid five times).
        hu_window: (min, max) HU; intensities are clipped to it and scaled to [0, 1].
        crop_margin: voxels kept around the lung's bounding box on each side, per axis.
        mask_intensity: set the voxels outside the lung mask to zero before cropping.
        orientation: axis codes of the working grid.
        threshold: probability at or above which a case is called COVID-19.
        strict_hu: refuse (instead of warn about) volumes that do not look like HU.
    """

    roi_size: tuple[int, int, int] = (192, 192, 64)
    hu_window: tuple[float, float] = (-1000.0, 500.0)
    crop_margin: tuple[int, int, int] = (10, 10, 2)
    mask_intensity: bool = False
    orientation: str = "RAS"
    threshold: float = 0.5
    strict_hu: bool = False

    def __post_init__(self) -> None:
        if len(self.roi_size) != 3 or min(self.roi_size) < 32:
            raise ValueError(f"roi_size must be three sides >= 32 for DenseNet121, got {tuple(self.roi_size)}")
        if len(self.crop_margin) != 3 or min(self.crop_margin) < 0:
            raise ValueError(f"crop_margin must be three non-negative voxel counts, got {tuple(self.crop_margin)}")
        if not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window must be (min, max) with min < max, got {tuple(self.hu_window)}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")

    def replace(self, **changes: Any) -> "ClsConfig":
        """A copy with ``changes`` applied (None values are ignored), validated again.

        Raises:
            ValueError: for a given setting the classifier does not have (e.g. ``spacing``).
        """
        changes = {k: _as_tuple(v) for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - self._names())
        if unknown:
            raise ValueError(f"covid_cls has no setting {unknown}; its settings are {sorted(self._names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict for checkpoints (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ClsConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        unknown = sorted(set(values) - cls._names())
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(cls._names())}")
        return cls(**{k: _as_tuple(v) for k, v in values.items()})

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def build_network(*, in_channels: int = 1, out_channels: int = 1, init_features: int = 64,
                  growth_rate: int = 32, dropout_prob: float = 0.0) -> DenseNet121:
    """MONAI 3D DenseNet121 (blocks 6-12-24-16) giving ``out_channels`` logits.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: logits per case; 1 for the binary COVID-19 model (Float[B, 1]).
        init_features: channels of the stem; 64 in the standard network (smaller in tests).
        growth_rate: channels added per dense layer; 32 in the standard network.
        dropout_prob: dropout inside the dense layers.

    Raises:
        ValueError: for non-positive sizes or a dropout outside [0, 1).
    """
    if min(in_channels, out_channels, init_features, growth_rate) < 1:
        raise ValueError(f"in_channels, out_channels, init_features and growth_rate must be >= 1, got "
                         f"{in_channels}, {out_channels}, {init_features}, {growth_rate}")
    if not 0.0 <= dropout_prob < 1.0:
        raise ValueError(f"dropout_prob must lie in [0, 1), got {dropout_prob}")
    return DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                       init_features=init_features, growth_rate=growth_rate, dropout_prob=dropout_prob)


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


def augmentation(config: ClsConfig) -> list:
    """Random flips (left-right, anterior-posterior) and a small rotation in the axial plane."""
    keys = (IMAGE_KEY, MASK_KEY)
    angle = math.radians(ROTATION_DEGREES)
    return [
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotated(keys, range_z=angle, prob=0.5, mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]


class BinaryLoss(torch.nn.BCEWithLogitsLoss):
    """BCE-with-logits on logits Float[B, 1] against labels Float[B] or Float[B, 1] in {0, 1}."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, labels.to(logits.dtype).view_as(logits))


def loss() -> torch.nn.Module:
    """BCE-with-logits (:class:`BinaryLoss`)."""
    return BinaryLoss()


def postprocessing(config: ClsConfig):
    """Logits Float[B, 1] -> COVID-19 probabilities Float[B]."""
    return lambda logits: torch.sigmoid(logits.float()).flatten()


def classification_metrics(labels: Sequence[int], probabilities: Sequence[float], *,
                           threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, sensitivity, specificity at ``threshold`` and ROC AUC of binary predictions.

    Args:
        labels: ground truth per case, 1 COVID-19, 0 otherwise.
        probabilities: predicted COVID-19 probability per case.
        threshold: probability at or above which a case is called positive.

    Returns:
        ``accuracy``, ``sensitivity`` (true-positive rate), ``specificity`` (true-negative rate),
        ``auc`` (NaN when only one class is present; so are the rates without cases of their
        class), and the counts ``tp``, ``fp``, ``tn``, ``fn``, ``n``.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"need one probability per label and at least one case, got {y.size} and {p.size}")
    matrix = confusion_matrix(y, (p >= threshold).astype(np.int64), num_classes=2)  # rows true, cols predicted
    rates = per_class_rates(matrix)
    (tn, fp), (fn, tp) = matrix.tolist()
    return {"accuracy": float(np.trace(matrix) / y.size), "sensitivity": float(rates["sensitivity"][1]),
            "specificity": float(rates["specificity"][1]), "auc": _auc(y, p),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": int(y.size)}


def predict_case(case: dict, *, model: torch.nn.Module, config: ClsConfig, device: torch.device,
                 saliency: str | None = None, target_layer: str | None = None) -> dict:
    """Classify one case and, optionally, map its GradCAM saliency back onto the input's grid.

    Args:
        case: ``{"image": path, "label_image": lung mask path}``, optionally ``"label"``, ``"case"``.
        model: the classifier in eval mode on ``device`` (logits Float[B, 1]).
        config: the checkpoint's pre-processing settings.
        device: where the network runs.
        saliency: None, ``"gradcam"`` or ``"gradcampp"``.
        target_layer: layer for the saliency map (None: :data:`saliency.TARGET_LAYER`).

    Returns:
        dict with ``case``, ``probability`` (float), ``prediction`` (0/1 at ``config.threshold``),
        ``label`` when known, and with ``saliency``: ``saliency`` Float32[X, Y, Z] in [0, 1] with
        exactly the input's shape, ``affine`` Float64[4, 4] (the input's), ``image`` Float32[X, Y, Z] HU.

    Raises:
        ValueError: naming the case for unreadable or invalid input.
    """
    transforms = preprocessing(config)
    loaded = _apply(transforms[0], case)
    rest = Compose(transforms[1:])
    data = _apply(rest, dict(loaded))
    image = data[IMAGE_KEY].as_tensor()[None].to(device)  # [1, 1, *roi_size]
    with torch.inference_mode():
        probability = float(postprocessing(config)(model(image))[0])
    out = {"case": case_name(case), "probability": probability, "prediction": int(probability >= config.threshold)}
    if LABEL_KEY in data:
        out[LABEL_KEY] = int(data[LABEL_KEY])
    if saliency:
        out.update(_saliency_on_input_grid(data, rest, loaded[IMAGE_KEY], model=model, image=image,
                                           method=saliency, target_layer=target_layer or TARGET_LAYER))
    return out


def evaluate(model: torch.nn.Module, dataset, *, config: ClsConfig, device: torch.device, amp: bool = False,
             progress: bool = False, **_: Any) -> dict:
    """Metrics of pre-processed validation cases (``image`` Float[1, *roi_size], ``label``).

    Returns:
        :func:`classification_metrics` at ``config.threshold`` plus ``probabilities`` (per case).
    """
    from tqdm import tqdm

    model.eval()
    labels, probabilities = [], []
    for index in tqdm(range(len(dataset)), desc="validate", disable=not progress, leave=False):
        item = _apply(dataset.__getitem__, index)
        image = item[IMAGE_KEY].as_tensor()[None].to(device)  # [1, 1, *roi_size]
        with torch.inference_mode(), _autocast(device, amp):
            probabilities.append(float(postprocessing(config)(model(image))[0]))
        labels.append(int(item[LABEL_KEY]))
    return {**classification_metrics(labels, probabilities, threshold=config.threshold),
            "probabilities": probabilities}


def validate_cases(cases: list[dict], *, model: torch.nn.Module, config: ClsConfig, device: torch.device,
                   progress: bool = True, **_: Any) -> tuple[list[dict], dict]:
    """Classify labelled cases from their files; rows for predictions.csv and the summary.

    Returns:
        (rows with ``case``, ``image``, ``label``, ``probability``, ``prediction``; summary with
        ``task``, ``cases``, ``threshold`` and :func:`classification_metrics`).

    Raises:
        ValueError: naming a case without a numeric ``label``.
    """
    from tqdm import tqdm

    rows = []
    for case in tqdm(cases, desc="validate", disable=not progress):
        if case.get(LABEL_KEY) is None:
            raise ValueError(f"case {case_name(case)}: validation needs a numeric 'label' (0 or 1)")
        out = predict_case(case, model=model, config=config, device=device)
        rows.append({"case": out["case"], "image": case[IMAGE_KEY], "label": out[LABEL_KEY],
                     "probability": round(out["probability"], 6), "prediction": out["prediction"]})
    metrics = classification_metrics([r["label"] for r in rows], [r["probability"] for r in rows],
                                     threshold=config.threshold)
    return rows, {"task": TASK.name, "cases": len(rows), "threshold": config.threshold, **metrics}


def infer_cases(cases: list[dict], *, model: torch.nn.Module, config: ClsConfig, device: torch.device,
                output: str | Path, saliency: str | None = None, lung_model: tuple | None = None,
                progress: bool = True) -> list[dict]:
    """Classify cases; write saliency maps and, for cases without a lung mask, the lung_seg mask.

    Args:
        cases: dicts with ``image`` and, optionally, ``label_image`` (lung mask) and ``label``.
        model, config, device: the classifier and its settings (see :func:`predict_case`).
        output: folder for ``<case>_saliency.nii.gz``/``.png`` and ``<case>_lung_seg.nii.gz``.
        saliency: None, ``"gradcam"`` or ``"gradcampp"``.
        lung_model: ``(model, task, config)`` of a lung_seg checkpoint (from
            :func:`models.volumetric.inference.load_task_model`) for cases without a lung mask.
        progress: show a progress bar.

    Returns:
        One row per case for predictions.csv: ``case``, ``probability``, ``prediction``, ``label``
        (empty when unknown), ``lung_mask``, ``saliency``, ``overlay`` (paths, empty when not written).

    Raises:
        ValueError: naming a case that has no lung mask when ``lung_model`` is None.
    """
    from tqdm import tqdm

    rows = []
    for case in tqdm(cases, desc="infer", disable=not progress):
        if not case.get(MASK_KEY):
            case = {**case, MASK_KEY: _segment_lungs(case, lung_model, device=device, output=Path(output))}
        out = predict_case(case, model=model, config=config, device=device, saliency=saliency)
        files = save_saliency_outputs(out, output, hu_window=config.hu_window) if saliency else {}
        rows.append({"case": out["case"], "probability": round(out["probability"], 6),
                     "prediction": out["prediction"], "label": out.get(LABEL_KEY, ""), "lung_mask": case[MASK_KEY],
                     "saliency": files.get("saliency", ""), "overlay": files.get("overlay", "")})
    return rows


def _segment_lungs(case: dict, lung_model: tuple | None, *, device: torch.device, output: Path) -> str:
    """Lung mask of a case from the lung_seg model, written on the input's grid; returns its path."""
    from models.volumetric.inference import predict_case as segment_case
    from models.volumetric.inference import save_mask

    if lung_model is None:
        raise ValueError(f"case {case_name(case)}: no lung mask ('{MASK_KEY}'); give one in dataset.json or a "
                         "lung_seg checkpoint (infer_volumetric.py --lung_ckpt)")
    model, task, config = lung_model
    out = segment_case({IMAGE_KEY: case[IMAGE_KEY], "case": case_name(case)}, model=model, task=task, config=config,
                       device=device)
    return str(save_mask(out["mask"], out["affine"], output / f"{out['case']}_lung_seg.nii.gz"))


def _saliency_on_input_grid(data: dict, transform: Compose, original: torch.Tensor, *, model, image, method,
                            target_layer) -> dict:
    """GradCAM on the network grid, inverted through ``transform`` onto ``original``'s grid."""
    explainer = explainer_for(model, method=method, target_layer=target_layer)
    with torch.enable_grad():
        maps, _ = explainer(image)
    data[SALIENCY_KEY] = MetaTensor(maps[0].cpu())
    inverted = Invertd(SALIENCY_KEY, transform=transform, orig_keys=IMAGE_KEY, nearest_interp=False)(data)
    saliency = inverted[SALIENCY_KEY]
    name = case_name(data)
    if tuple(saliency.shape) != tuple(original.shape):
        raise RuntimeError(f"case {name}: saliency shape {tuple(saliency.shape)} differs from the input's "
                           f"{tuple(original.shape)}")
    affine = np.asarray(original.affine.cpu().numpy(), dtype=np.float64)
    if not np.allclose(np.asarray(saliency.affine.cpu().numpy()), affine, atol=1e-4):
        raise RuntimeError(f"case {name}: saliency affine differs from the input's")
    return {SALIENCY_KEY: np.clip(saliency[0].cpu().numpy(), 0.0, 1.0).astype(np.float32), "affine": affine,
            IMAGE_KEY: np.asarray(original[0].cpu().numpy(), dtype=np.float32)}


def _apply(transform, data: dict) -> dict:
    try:
        return transform(data)
    except RuntimeError as err:  # MONAI wraps errors in "applying transform ..."
        raise unwrap_transform_error(err) from err


def _autocast(device: torch.device, amp: bool):
    from models.volumetric.ssl_pretrain import autocast

    return autocast(device, amp)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    if len(set(y.tolist())) < 2:
        warnings.warn("ROC AUC is undefined with one class present; reported as NaN", stacklevel=3)
        return float("nan")
    return roc_auc(y, p)


def _class_label(value: Any, name: str) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"case {name}: label must be 0 or 1, got {value!r}") from None
    if label not in (0.0, 1.0):
        raise ValueError(f"case {name}: label must be 0 or 1, got {value!r}")
    return label


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


TASK = Task(
    name="covid_cls",
    kind="classification",
    builder="models.volumetric.covid_cls.build_network",
    network_kwargs={"in_channels": 1, "out_channels": 1},
    default_config=ClsConfig(),
    roi_multiple=1,
    preprocessing=preprocessing,
    augmentation=augmentation,
    loss=loss,
    postprocessing=postprocessing,
    default_lr=5e-6,
    class_names=CLASS_NAMES,
)
