"""Task ``lesion_seg``: COVID-19 lesion segmentation of chest CT with MONAI's SegResNet.

Pre-processing: orientation RAS, resample to 0.8 x 0.8 x 5 mm, clip to [-1000, 500] HU and scale to
[0, 1]. Augmentation: random 224 x 224 x 32 crops (short scans padded; half of them centred on a
lesion), random flips, a small in-plane rotation and an intensity shift. Training: Adam 1e-3,
cross-entropy plus a batch Dice of the lesion class (nnU-Net's form: the Dice leaves the background
out and pools the batch, so a crop without lesions does not reward predicting none). GGO and
consolidation (label values 1 and 2) are one lesion class. The task has a MONAI bundle.
"""
from __future__ import annotations

import functools
import math

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet
from monai.transforms import (
    Identity,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    RandShiftIntensityd,
    SpatialPadd,
)

from models.volumetric.bundle.segmentation import segmentation_bundle
from models.volumetric.common import IMAGE_KEY, LABEL_KEY
from models.volumetric.config import SegConfig
from models.volumetric.segmentation import seg_preprocessing
from models.volumetric.task import Task
from models.volumetric.training import evaluate_dice

NORM_GROUPS = 8  # SegResNet's default group norm
ROTATION_DEGREES = 15.0
INTENSITY_SHIFT = 0.1  # on the [0, 1] scale, i.e. 150 HU for the default window


def build_network(*, in_channels: int = 1, out_channels: int = 2, init_filters: int = 8,
                  blocks_down: tuple[int, ...] = (1, 2, 2, 4), blocks_up: tuple[int, ...] = (1, 1, 1),
                  dropout_prob: float | None = None) -> SegResNet:
    """MONAI 3D SegResNet.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: classes including background (logits Float[B, out_channels, X, Y, Z]).
        init_filters: channels of the first stage, a multiple of 8; later stages double it.
        blocks_down: residual blocks per encoder stage; ROI sides must be multiples of
            ``2 ** (len(blocks_down) - 1)``.
        blocks_up: residual blocks per decoder stage, ``len(blocks_down) - 1`` of them.
        dropout_prob: dropout after the first convolution, or None.

    Raises:
        ValueError: for inconsistent values, naming them.
    """
    if in_channels < 1 or out_channels < 2 or init_filters < 1:
        raise ValueError(f"need in_channels >= 1, out_channels >= 2, init_filters >= 1, got "
                         f"{in_channels}, {out_channels}, {init_filters}")
    if init_filters % NORM_GROUPS:
        raise ValueError(f"init_filters must be a multiple of {NORM_GROUPS} (SegResNet's group norm), "
                         f"got {init_filters}")
    if len(blocks_up) != len(blocks_down) - 1:
        raise ValueError(f"blocks_up needs len(blocks_down) - 1 = {len(blocks_down) - 1} entries, "
                         f"got {tuple(blocks_up)}")
    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                     init_filters=init_filters, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
                     dropout_prob=dropout_prob)


def augmentation(config: SegConfig) -> list:
    """Pad to the ROI, crop (lesion-centred or not, 1:1), flip on every axis, rotate, shift intensity."""
    keys = (IMAGE_KEY, LABEL_KEY)
    angle = math.radians(ROTATION_DEGREES)
    return [
        SpatialPadd(keys, spatial_size=config.roi_size),
        RandCropByPosNegLabeld(keys, label_key=LABEL_KEY, spatial_size=config.roi_size, pos=1, neg=1,
                               num_samples=1, image_key=IMAGE_KEY, image_threshold=0.0),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandRotated(keys, range_z=angle, prob=0.3, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandShiftIntensityd(IMAGE_KEY, offsets=INTENSITY_SHIFT, prob=0.5),
    ]


def loss() -> torch.nn.Module:
    """Cross-entropy + soft Dice of the lesion class over the whole batch (softmax, one-hot labels).

    With the background in the Dice and a Dice per crop, half the crops (those without lesions)
    score best when nothing is predicted, and on some phantom seeds the model learned exactly that.
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def postprocessing(config: SegConfig) -> Identity:
    """Lesions are kept as predicted."""
    return Identity()


def bundle_postprocessing(config: SegConfig) -> list[dict]:
    """:func:`postprocessing` in a MONAI bundle: nothing."""
    return []


BUNDLE = segmentation_bundle(
    network="SegResNet",
    fixed_args={"spatial_dims": 3},
    task_text="COVID-19 lesion (ground-glass opacity and consolidation) segmentation of chest CT",
    purpose="segments COVID-19 lesions, ground-glass opacity and consolidation as one class",
    reference="Myronenko A. 3D MRI brain tumor segmentation using autoencoder regularization. "
              "BrainLes 2018. https://arxiv.org/abs/1810.11654",
    postprocessing=bundle_postprocessing,
    post_text="Post-processing: argmax.",
)

TASK = Task(
    name="lesion_seg",
    kind="segmentation",
    builder="models.volumetric.lesion_seg.build_network",
    network_kwargs={"in_channels": 1, "out_channels": 2, "init_filters": 8},
    # Lesions lie inside the lungs: windows cover the lung box (plus a margin), not the whole body.
    default_config=SegConfig(spacing=(0.8, 0.8, 5.0), roi_size=(224, 224, 32), hu_window=(-1000.0, 500.0),
                             crop_region="lung", crop_margin=12),
    roi_multiple=8,
    preprocessing=seg_preprocessing,
    augmentation=augmentation,
    loss=loss,
    postprocessing=postprocessing,
    default_lr=1e-3,
    class_names=("background", "lesion"),
    bundle=BUNDLE,
    # checkpoint_best by the Dice of the validation scans with lesions: with lesion-free scans scoring
    # 1 for an empty prediction, a model that finds nothing outscored one that starts to find lesions
    evaluate=functools.partial(evaluate_dice, ignore_empty=True),
)
