"""Convert a checkpoint of the original COVID-CT-Mask-Net into this project's checkpoint schema.

Canonical command::

    python convert_checkpoint.py pretrained_models/segmentation_model.pth runs/converted/segmentation_model.pth

The original file (``torch.save`` of ``model_weights``, ``anchor_generator``, ``optimizer_state``,
``epoch``, ``model_name``, ``lrate``) is read with a restricted unpickler that refuses any global
other than tensors, plain containers and the anchor generator, so reading it cannot run code. The
weights are renamed to our parameter names, the architecture (backbone, truncation, classes, B,
S's width, anchors) is read from tensor shapes and the pickled anchor generator, the weights are
loaded strictly into the rebuilt model, and the result is written with
``utils.checkpoint.save_checkpoint``: a segmentation model for ``inference_segmentation.py --ckpt
NEW``, a classifier (``s2new.*`` present) for ``evaluate_classifier.py --ckpt NEW``. The optimizer
state is not carried over; ``epoch`` becomes our 0-based last completed epoch (original minus 1).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.mask_net.legacy import LEGACY_S_PREFIX, convert_legacy_checkpoint
from utils.checkpoint import save_checkpoint
from utils.cli import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="checkpoint of the original COVID-CT-Mask-Net (.pth) to read (required)")
    p.add_argument("new", help="path of the converted checkpoint to write (required)")
    p.add_argument("--mask_type", default=None, choices=["both", "ggo", "merge"],
                   help="segmentation checkpoints: the lesion classes the model was trained on; ignored for "
                        "classifiers (default: both for 3 classes, merge for 2)")
    p.add_argument("--overwrite", action="store_true", help="replace NEW when it exists (default: off, an error)")
    return p


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


def main(args: argparse.Namespace) -> Path:
    """Convert ``args.old`` into ``args.new``; returns the written path.

    Raises:
        FileNotFoundError: when OLD does not exist.
        FileExistsError: when NEW exists and ``--overwrite`` is not given.
        ValueError: when OLD and NEW are the same file, or OLD is unusable (the message names it).
    """
    old, new = Path(args.old), Path(args.new)
    if new.exists() and old.exists() and new.resolve() == old.resolve():
        raise ValueError(f"{new}: NEW must differ from OLD; the original file is kept unchanged")
    if new.exists() and not args.overwrite:
        raise FileExistsError(f"{new} exists; pass --overwrite to replace it")
    checkpoint, info = convert_legacy_checkpoint(source=old, mask_type=args.mask_type)
    print(f"read {old}")
    for line in describe(info):
        print(f"  {line}")
    path = save_checkpoint(checkpoint, new)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main, get_args_parser())
