"""Train the COVID-CT-Mask-Net lesion segmentation model (Mask R-CNN) on CNCB-layout slices.

Canonical command (the original README's, with the phantom data directories)::

    python train_segmentation.py --num_epochs 100 --mask_type merge --save_every 10 \
        --backbone_name resnet18 --truncation 1 --device cpu \
        --train_data_dir data/phantom/seg/train --val_data_dir data/phantom/seg/val

The run directory (``--save_dir``) receives args.json, env.txt, metrics.jsonl, checkpoint_last.pth,
checkpoint_best.pth (highest validation mask mAP so far, kept across --resume) and every ``--save_every`` epochs
``<model_name>_ckpt_<epoch>.pth``, all in the project's checkpoint schema. The pipeline is
``models.mask_net.workflows.train_segmentation``. ``--preset paper`` reproduces the original's anchor
and RoI matching; the default ``lesion`` preset learns faster on small lesions (README).

Several processes (DDP; ``--batch_size`` is per process, rank 0 alone validates and writes)::

    torchrun --nproc_per_node N train_segmentation.py --device cuda ...   # add --nnodes M for M machines
"""
from __future__ import annotations

import argparse

from models.mask_net.workflows.cli import SAMPLING_FLAGS, add_model_args
from models.mask_net.workflows.segmentation import PRESETS, train_segmentation
from models.mask_net.workflows.segmentation import SegmentationTrainConfig as Config
from utils.cli import (
    add_amp_arg,
    add_device_args,
    add_epoch_args,
    add_optimisation_args,
    add_run_args,
    add_seed_args,
    config_from_args,
    dataclass_defaults,
    run_cli,
)
from utils.run_dir import RunDir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, names=("backbone_name", "truncation", "rpn_nms_th", "image_size", "mask_type"),
                   defaults=dataclass_defaults(Config))
    p.add_argument("--preset", choices=sorted(PRESETS), default=Config.preset,
                   help="training preset: lesion (RoI foreground/background IoU 0.5/0.5, 128 RoIs per image, "
                        "128 FPN channels, mask-overlap suppression 0.5) or paper (COVID-CT-Mask-Net's 0.75/0.5, "
                        "256, 256, none); the flags below override it (default: lesion)")
    add_model_args(p, names=SAMPLING_FLAGS, unset="the preset's")
    add_epoch_args(p, model_name=Config.model_name)
    p.add_argument("--pretrained_model", default=None,
                   help="checkpoint whose model weights initialise training (default: none)")
    p.add_argument("--use_pretrained_resnet_backbone", default=None, metavar="PATH",
                   help="local torchvision ResNet state dict loaded into the backbone; nothing is downloaded "
                        "(default: none)")
    add_run_args(p, default_save_dir=Config.save_dir)
    p.add_argument("--train_data_dir", default=Config.train_data_dir,
                   help=f"training data root (default: {Config.train_data_dir})")
    p.add_argument("--val_data_dir", default=Config.val_data_dir,
                   help=f"validation data root (default: {Config.val_data_dir})")
    p.add_argument("--imgs_dir", default="imgs", help="image folder inside each data root (default: imgs)")
    p.add_argument("--gt_dir", default="masks", help="mask folder inside each data root (default: masks)")
    p.add_argument("--augment", action="store_true",
                   help="augment training slices: horizontal flip, zoom 0.9-1.1, brightness and contrast +-0.1 "
                        "(default: off)")
    add_optimisation_args(p, batch_size=Config.batch_size, unit="images")
    add_device_args(p)
    add_amp_arg(p)
    add_seed_args(p)
    return p


def main(args: argparse.Namespace) -> RunDir | None:
    return train_segmentation(config_from_args(Config, args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
