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
state is not carried over; ``epoch`` becomes our 0-based last completed epoch (original minus 1). The
pipeline is ``models.mask_net.workflows.conversion.convert_checkpoint``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.mask_net.workflows.cli import add_model_args
from models.mask_net.workflows.conversion import ConversionConfig, convert_checkpoint
from utils.cli import config_from_args, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="checkpoint of the original COVID-CT-Mask-Net (.pth) to read (required)")
    p.add_argument("new", help="path of the converted checkpoint to write (required)")
    add_model_args(p, names=("mask_type",), unset="both for 3 classes, merge for 2; ignored for classifiers")
    p.add_argument("--overwrite", action="store_true", help="replace NEW when it exists (default: off, an error)")
    return p


def main(args: argparse.Namespace) -> Path:
    return convert_checkpoint(config_from_args(ConversionConfig, args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
