"""Mask and box average precision of a lesion segmentation model over IoU 0.50:0.05:0.95.

Canonical command (the original README's, with the phantom test data)::

    python evaluation_mean_ap.py --backbone_name resnet18 --ckpt model.pth --mask_type merge \
        --truncation 1 --rpn_nms_th 0.75 --roi_nms_th 0.75 --confidence_th 0.75 \
        --test_data_dir data/phantom/seg/test

Prints AP@0.5, AP@0.75, mAP@[0.5:0.95] and AP at each threshold, overall and per class, for masks
(segm) and boxes (bbox), and writes them to ``<save_dir>/metrics.json``. ``--style coco`` (default)
is dataset-level COCO AP, equal to pycocotools' COCOeval; ``--style per_image`` is the original
repository's per-image-averaged AP, for comparison with its published table. The pipeline is
``models.mask_net.workflows.evaluate_mean_ap``.
"""
from __future__ import annotations

import argparse

from models.mask_net.workflows.cli import add_segmentation_inference_args
from models.mask_net.workflows.evaluation import MeanAPConfig as Config
from models.mask_net.workflows.evaluation import evaluate_mean_ap
from utils.cli import add_device_args, add_output_args, config_from_args, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="segmentation checkpoint (required)")
    p.add_argument("--test_data_dir", default=Config.test_data_dir, help=f"data root (default: {Config.test_data_dir})")
    p.add_argument("--test_imgs_dir", default="imgs", help="image folder inside the data root (default: imgs)")
    p.add_argument("--gt_dir", default="masks", help="mask folder inside the data root (default: masks)")
    add_segmentation_inference_args(p)
    p.add_argument("--style", default="coco", choices=["coco", "per_image"],
                   help="coco: dataset-level COCO AP; per_image: the original's per-image average (default: coco)")
    add_output_args(p, default=Config.save_dir, what="metrics.json")
    add_device_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    return evaluate_mean_ap(config_from_args(Config, args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
