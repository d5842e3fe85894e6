"""Convert a checkpoint of the original COVID-CT-Mask-Net into this project's checkpoint schema.

The reading (restricted unpickler), renaming and architecture inference are those of
:mod:`models.mask_net.legacy`; :func:`convert_checkpoint` adds the file handling: NEW must differ from
OLD and is replaced only with ``overwrite``, and what was inferred is printed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.mask_net.legacy import LEGACY_S_PREFIX, convert_legacy_checkpoint
from utils.checkpoint import save_checkpoint


@dataclass(kw_only=True)
class ConversionConfig:
    """Settings of :func:`convert_checkpoint`.

    Attributes:
        old: checkpoint of the original COVID-CT-Mask-Net (.pth) to read.
        new: path of the converted checkpoint to write.
        mask_type: segmentation checkpoints: the lesion classes the model was trained on; ignored for
            classifiers (None: both for 3 classes, merge for 2).
        overwrite: replace NEW when it exists.
    """

    old: str
    new: str
    mask_type: str | None = None
    overwrite: bool = False


def describe(info: dict) -> list[str]:
    """Lines that say what was inferred from the original file."""
    anchors, args = info["anchors"], info["args"]
    lines = [f"kind: {info['kind']} -> {info['builder']}",
             f"backbone: {info['backbone_name']} ({info['body']}), truncation {info['truncation']}",
             f"num_classes: {info['num_classes']} (background included, from box_predictor.cls_score)",
             f"box head width: {info['representation_size']}, FPN channels: {info['fpn_channels']}"]
    if info["kind"] == "classifier":
        lines.append(f"S ({LEGACY_S_PREFIX}*): B (roi_batch_size) = {info['roi_batch_size']}, "
                     f"s_features = {info['s_features']}")
    else:
        lines.append(f"mask head layers: {list(info['mask_layers'])}; mask_type: {info['mask_type']}")
    lines.append(f"anchors: sizes {anchors['sizes']}, aspect ratios {anchors['aspect_ratios']} from {anchors['from']}"
                 f" ({'passed as builder overrides' if anchors['overrides'] else 'equal to our defaults'})")
    lines.append(f"epoch: original {args['original_epoch']!r} (epochs done) -> {info['epoch']} (0-based, last "
                 f"completed); model_name {args['original_model_name']!r}, lrate {args['original_lrate']!r}")
    if info["filled_num_batches_tracked"]:
        lines.append(f"filled {info['filled_num_batches_tracked']} absent BatchNorm num_batches_tracked with 0")
    lines.append(f"builder_kwargs: {info['builder_kwargs']}")
    lines.append(f"{info['tensors']} tensors loaded strictly; optimizer state not carried over")
    return lines


def convert_checkpoint(config: ConversionConfig) -> Path:
    """Convert ``config.old`` into ``config.new``; returns the written path.

    Raises:
        FileNotFoundError: when OLD does not exist.
        FileExistsError: when NEW exists and ``overwrite`` is not set.
        ValueError: when OLD and NEW are the same file, or OLD is unusable (the message names it).
    """
    old, new = Path(config.old), Path(config.new)
    if new.exists() and old.exists() and new.resolve() == old.resolve():
        raise ValueError(f"{new}: NEW must differ from OLD; the original file is kept unchanged")
    if new.exists() and not config.overwrite:
        raise FileExistsError(f"{new} exists; pass --overwrite to replace it")
    checkpoint, info = convert_legacy_checkpoint(source=old, mask_type=config.mask_type)
    print(f"read {old}")
    for line in describe(info):
        print(f"  {line}")
    path = save_checkpoint(checkpoint, new)
    print(f"wrote {path}")
    return path
