"""Task ``organ_seg``: abdominal multi-organ segmentation (BTCV's 13 organs) with MONAI's UNETR.

As in MONAI's UNETR tutorial: orientation RAS, resample to 1.5 x 1.5 x 2 mm, window [-175, 250]
HU scaled to [0, 1]; training on 96^3 crops (half centred on an organ), random flips, 90-degree
rotations and intensity shifts; DiceCE loss on 14 classes (13 organs + background);
sliding-window validation with per-organ Dice.

The ViT encoder can start from ``ssl_pretrain``: :func:`load_pretrained_encoder` copies every
tensor of ``model.vit`` from the ViTAutoEnc checkpoint and reports how many keys loaded; a missing
or mis-shaped key is an error, so a transfer is all of the ViT or nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNETR
from monai.transforms import (
    Identity,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from tqdm import tqdm

from datasets.synthetic.abdomen import ORGAN_NAMES as BTCV_LABELS
from models.volumetric.common import IMAGE_KEY, LABEL_KEY, LoadVolumed, case_name
from models.volumetric.config import SegConfig
from models.volumetric.segmentation import segment_case
from models.volumetric.sliding_window import segment
from models.volumetric.task import Task
from models.volumetric.vit import PATCH_SIZE, check_vit_sizes, img_size_from_roi
from utils.checkpoint import load_checkpoint
from utils.dice import dice_per_class, mean_ignoring_nan

LOGGER = logging.getLogger(__name__)
CLASS_NAMES = BTCV_LABELS  # BTCV order: "background", then organs with label values 1..13
ORGAN_NAMES = CLASS_NAMES[1:]
NUM_CLASSES = len(CLASS_NAMES)


def build_network(*, img_size: Sequence[int] = (96, 96, 96), in_channels: int = 1, out_channels: int = NUM_CLASSES,
                  feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072, num_heads: int = 12,
                  norm_name: str = "instance", res_block: bool = True, dropout_rate: float = 0.0) -> UNETR:
    """MONAI UNETR: a 12-layer ViT encoder (16^3 patches) with a convolutional decoder.

    Args:
        img_size: ROI (x, y, z), each a multiple of 16; also the sliding-window size.
        in_channels: image channels (1 for CT).
        out_channels: classes including background (logits Float[B, out_channels, *img_size]).
        feature_size: decoder width of the first stage.
        hidden_size, mlp_dim, num_heads: the ViT's sizes; they must match an ``ssl_pretrain``
            checkpoint to transfer it.
        norm_name: decoder normalisation (``"instance"`` or ``"batch"``).
        res_block: residual decoder blocks.
        dropout_rate: dropout in the ViT, in [0, 1).

    Raises:
        ValueError: for sizes UNETR cannot take, naming them.
    """
    img_size = check_vit_sizes(img_size, hidden_size=hidden_size, num_heads=num_heads, mlp_dim=mlp_dim,
                                dropout_rate=dropout_rate)
    if out_channels < 2 or feature_size < 1:
        raise ValueError(f"need out_channels >= 2 and feature_size >= 1, got {out_channels} and {feature_size}")
    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=img_size, feature_size=feature_size,
                 hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, proj_type="conv",
                 norm_name=norm_name, res_block=res_block, dropout_rate=dropout_rate, spatial_dims=3)


class CheckLabelRanged(MapTransform):
    """Refuse a label map with values outside ``[0, num_classes)``, naming the case and the values."""

    def __init__(self, key: str = LABEL_KEY, *, num_classes: int = NUM_CLASSES):
        super().__init__(key, allow_missing_keys=True)
        self.num_classes = num_classes

    def __call__(self, data: dict) -> dict:
        for key in self.key_iterator(data):
            values = torch.unique(torch.as_tensor(data[key]))
            bad = [v for v in values.tolist() if v < 0 or v >= self.num_classes or v != int(v)]
            if bad:
                raise ValueError(f"case {case_name(data)}: {key} holds values {bad[:5]} outside the organ labels "
                                 f"0..{self.num_classes - 1}")
        return data


def preprocessing(config: SegConfig, *, keys: Sequence[str] = (IMAGE_KEY, LABEL_KEY)) -> list:
    """Load, orient, resample (labels nearest), window the image; check the organ labels.

    Returns:
        Dictionary transforms; ``image`` ends as Float[1, X, Y, Z] in [0, 1], ``label`` as
        Float[1, X, Y, Z] with values in 0..13.
    """
    keys = tuple(keys)
    modes = tuple("bilinear" if k == IMAGE_KEY else "nearest" for k in keys)
    low, high = config.hu_window
    return [
        LoadVolumed(keys, strict_hu=config.strict_hu),
        CheckLabelRanged(LABEL_KEY),
        Orientationd(keys, axcodes=config.orientation, labels=None),
        Spacingd(keys, pixdim=config.spacing, mode=modes),
        ScaleIntensityRanged(IMAGE_KEY, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ]


def augmentation(config: SegConfig) -> list:
    """Pad to the ROI, crop (organ-centred or not, 1:1), flip, rotate by 90 degrees, shift intensity."""
    keys = (IMAGE_KEY, LABEL_KEY)
    return [
        SpatialPadd(keys, spatial_size=config.roi_size),
        RandCropByPosNegLabeld(keys, label_key=LABEL_KEY, spatial_size=config.roi_size, pos=1, neg=1,
                               num_samples=1, image_key=IMAGE_KEY, image_threshold=0.0),
        RandFlipd(keys, prob=0.1, spatial_axis=0),
        RandFlipd(keys, prob=0.1, spatial_axis=1),
        RandFlipd(keys, prob=0.1, spatial_axis=2),
        RandRotate90d(keys, prob=0.1, max_k=3),
        RandShiftIntensityd(IMAGE_KEY, offsets=0.1, prob=0.5),
    ]


def loss() -> torch.nn.Module:
    """Dice + cross-entropy on softmax probabilities against one-hot labels (14 classes)."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def postprocessing(config: SegConfig) -> Identity:
    """Organs are kept as predicted."""
    return Identity()


def load_pretrained_encoder(model: UNETR, path: str | Path) -> dict:
    """Copy the ViT weights of an ``ssl_pretrain`` checkpoint into ``model.vit``.

    Args:
        model: the UNETR.
        path: checkpoint written by ``train_volumetric.py --task ssl_pretrain``.

    Returns:
        ``{"loaded": n, "expected": n_vit, "ignored": keys of the checkpoint the ViT has not (the
        auto-encoder's decoder)}``; ``loaded == expected`` always holds on return.

    Raises:
        ValueError: naming the file when a ViT key is missing or has another shape (e.g. other
            ``hidden_size``/``mlp_dim``/``num_heads`` or ROI), or the checkpoint is no ViTAutoEnc.
    """
    ckpt = load_checkpoint(path)
    source = ckpt["model"]
    target = model.vit.state_dict()
    missing = sorted(k for k in target if k not in source)
    mismatched = sorted(k for k in target if k in source and source[k].shape != target[k].shape)
    if missing or mismatched:
        raise ValueError(f"{path}: cannot transfer the ViT encoder (builder {ckpt['builder']}): "
                         f"{len(missing)} keys missing {missing[:3]}, {len(mismatched)} with other shapes "
                         f"{[(k, tuple(source[k].shape), tuple(target[k].shape)) for k in mismatched[:3]]}; "
                         "pre-train with the same roi_size, hidden_size, mlp_dim, num_heads and 12 layers")
    model.vit.load_state_dict({k: source[k] for k in target}, strict=True)
    report = {"loaded": len(target), "expected": len(target), "ignored": sorted(set(source) - set(target))}
    LOGGER.info("loaded %d/%d ViT keys from %s", report["loaded"], report["expected"], path)
    return report


def print_encoder_transfer(model: UNETR, path: str | Path) -> dict:
    """:func:`load_pretrained_encoder`, saying how many keys loaded (``Task.pretrained["pretrained_encoder"]``)."""
    report = load_pretrained_encoder(model, path)
    print(f"pretrained encoder: loaded {report['loaded']}/{report['expected']} ViT keys from {path}")
    return report


def evaluate(model: torch.nn.Module, dataset, *, task: Task, config: SegConfig, device: torch.device,
             amp: bool = False, progress: bool = False) -> dict:
    """Sliding-window per-organ Dice of every validation case on the task's working grid.

    Returns:
        ``dice`` (mean over organs of the per-organ means), ``dice_<organ>`` (mean over cases, spaces
        in names become underscores) and ``per_case`` (per-organ lists), with the empty-GT
        convention of :mod:`utils.dice`.
    """
    model.eval()
    post = task.postprocessing(config)
    per_case = []
    for index in tqdm(range(len(dataset)), desc="validate", disable=not progress, leave=False):
        item = dataset[index]
        pred = post(segment(model, item[IMAGE_KEY], config=config, device=device, amp=amp))
        truth = item[LABEL_KEY].round().to(torch.uint8)
        per_case.append(dice_per_class(pred, truth, num_classes=len(task.class_names)))
    per_organ = {f"dice_{_column(name)}": mean_ignoring_nan(case[i] for case in per_case)
                 for i, name in enumerate(task.class_names[1:])}
    return {"dice": mean_ignoring_nan(per_organ.values()), **per_organ, "per_case": per_case}


def validate_cases(cases: list[dict], *, model: torch.nn.Module, task: Task, config: SegConfig,
                   device: torch.device, amp: bool = False, ignore_empty: bool = False,
                   progress: bool = True, **_: object) -> tuple[list[dict], dict]:
    """Per-organ Dice of every case on the input's own grid (mask mapped back, label read as is).

    Returns:
        (rows for predictions.csv: ``case``, ``image``, ``label``, ``dice`` (mean over organs) and
        one ``dice_<organ>`` column per organ; summary with ``mean_dice`` and ``dice_<organ>``
        means over cases).
    """
    rows = []
    for case in tqdm(cases, desc="validate", disable=not progress):
        if not case.get(LABEL_KEY):
            raise ValueError(f"case {case_name(case)}: validation needs a 'label' file")
        out = segment_case({IMAGE_KEY: case[IMAGE_KEY], "case": case_name(case)}, model=model, task=task,
                           config=config, device=device, amp=amp)
        truth = LoadVolumed((LABEL_KEY,))({LABEL_KEY: case[LABEL_KEY], "case": case_name(case)})[LABEL_KEY]
        scores = dice_per_class(out["mask"], truth[0].round().to(torch.uint8).numpy(),
                                num_classes=len(task.class_names), ignore_empty=ignore_empty)
        rows.append({"case": out["case"], "image": case[IMAGE_KEY], "label": case[LABEL_KEY],
                     "dice": mean_ignoring_nan(scores),
                     **{f"dice_{_column(n)}": d for n, d in zip(task.class_names[1:], scores)}})
    organs = {f"dice_{_column(n)}": mean_ignoring_nan(r[f"dice_{_column(n)}"] for r in rows)
              for n in task.class_names[1:]}
    summary = {"task": task.name, "cases": len(rows), "mean_dice": mean_ignoring_nan(organs.values()),
               "ignore_empty": ignore_empty, **organs}
    return rows, summary


def _column(name: str) -> str:
    return name.replace(" ", "_")


TASK = Task(
    name="organ_seg",
    kind="segmentation",
    builder="models.volumetric.organ_seg.build_network",
    network_kwargs={"img_size": [96, 96, 96], "in_channels": 1, "out_channels": NUM_CLASSES, "feature_size": 16,
                    "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
    default_config=SegConfig(spacing=(1.5, 1.5, 2.0), roi_size=(96, 96, 96), hu_window=(-175.0, 250.0)),
    roi_multiple=PATCH_SIZE,
    preprocessing=preprocessing,
    augmentation=augmentation,
    loss=loss,
    postprocessing=postprocessing,
    default_lr=1e-4,
    class_names=CLASS_NAMES,
    evaluate=evaluate,
    validate_cases=validate_cases,
    network_for_config=img_size_from_roi,
    pretrained={"pretrained_encoder": print_encoder_transfer},
)
