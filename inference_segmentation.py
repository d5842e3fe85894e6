"""Lesion segmentation of CT slices with a trained COVID-CT-Mask-Net segmentation model.

Canonical command::

    python inference_segmentation.py --ckpt runs/segmentation/checkpoint_best.pth \
        --test_data_dir data/phantom/seg/test --test_imgs_dir imgs --save_dir runs/inference

Writes one overlay PNG per slice (lesion masks coloured by class, boxes with scores, a legend) and
``predictions.json`` in COCO results format (RLE masks; each entry also names its ``file_name``).
Model settings (backbone, truncation, mask type, thresholds) come from the checkpoint unless a flag
gives them. The pipeline is ``models.mask_net.workflows.infer_segmentation``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.mask_net.workflows.cli import add_segmentation_inference_args
from models.mask_net.workflows.segmentation import SegmentationInferenceConfig as Config
from models.mask_net.workflows.segmentation import infer_segmentation
from utils.cli import add_device_args, add_output_args, config_from_args, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="segmentation checkpoint (required)")
    p.add_argument("--test_data_dir", default=Config.test_data_dir, help=f"data root (default: {Config.test_data_dir})")
    p.add_argument("--test_imgs_dir", default="imgs", help="image folder inside the data root (default: imgs)")
    add_output_args(p, default=Config.save_dir, what="overlays and predictions.json")
    add_segmentation_inference_args(p)
    p.add_argument("--no_overlays", action="store_true", help="write predictions.json only (default: overlays too)")
    add_device_args(p)
    return p


def main(args: argparse.Namespace) -> Path:
    return infer_segmentation(config_from_args(Config, args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
