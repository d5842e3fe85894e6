"""Train COVID-CT-Mask-Net's classification module S on top of a trained segmentation model.

Canonical command (the original README's, with the phantom data directories)::

    python train_classifier.py --pretrained_segmentation_model seg.pth --backbone_name resnet34 \
        --num_epochs 50 --save_every 10 --num_class 2 --truncation 1 --s_features 512 \
        --roi_batch_size 128 --batch_size 8 \
        --train_data_dir data/phantom/cls/train --val_data_dir data/phantom/cls/val

Weights of the backbone, FPN, RPN and RoI box branch are copied by name from the segmentation
checkpoint (its mask-branch weights are ignored); a classification checkpoint
(``--pretrained_classification_model``) loads strictly. Only S and the affine parameters of the
backbone's BatchNorm layers are trained; BatchNorm running statistics stay frozen and every other
parameter has ``requires_grad=False``. The default loss is the original's binary cross-entropy with
logits on one-hot labels (``--loss ce`` for cross-entropy). The run directory (``--save_dir``) receives
args.json, env.txt, metrics.jsonl, checkpoint_last.pth, checkpoint_best.pth (highest validation accuracy so
far, a tie going to the later epoch, kept across --resume) and every ``--save_every`` epochs
``<model_name>_ckpt_<epoch>.pth``. The pipeline is ``models.mask_net.workflows.train_classifier``.

Several processes (DDP; ``--batch_size`` is per process, rank 0 alone validates and writes)::

    torchrun --nproc_per_node N train_classifier.py --device cuda ...   # add --nnodes M for M machines
"""
from __future__ import annotations

import argparse

from models.mask_net.workflows.classifier import ClassifierTrainConfig as Config
from models.mask_net.workflows.classifier import train_classifier
from models.mask_net.workflows.cli import CLASSIFIER_FLAGS, add_model_args
from utils.cli import (
    add_amp_arg,
    add_device_args,
    add_epoch_args,
    add_optimisation_args,
    add_run_args,
    add_seed_args,
    config_from_args,
    run_cli,
)
from utils.run_dir import RunDir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_segmentation_model", default=None,
                   help="segmentation checkpoint whose weights (mask branch excluded) initialise the model "
                        "(default: none)")
    p.add_argument("--pretrained_classification_model", default=None,
                   help="classification checkpoint loaded strictly; takes precedence over the segmentation one "
                        "(default: none)")
    add_model_args(p, names=(*CLASSIFIER_FLAGS, "image_size"))
    add_epoch_args(p, model_name=Config.model_name)
    add_run_args(p, default_save_dir=Config.save_dir)
    p.add_argument("--train_data_dir", default=Config.train_data_dir,
                   help=f"training slices (default: {Config.train_data_dir})")
    p.add_argument("--val_data_dir", default=Config.val_data_dir,
                   help=f"validation slices (default: {Config.val_data_dir})")
    p.add_argument("--split_file", default=None,
                   help="COVIDx-CT split file selecting the training slices of --train_data_dir (default: every image)")
    p.add_argument("--val_split_file", default=None,
                   help="COVIDx-CT split file selecting the validation slices of --val_data_dir (default: every image)")
    p.add_argument("--crop_to_box", action="store_true", help="crop slices to the split file's lung box (default: off)")
    p.add_argument("--loss", default="bce", choices=["bce", "ce"],
                   help="bce: binary cross-entropy with logits on one-hot labels, as the original; ce: cross-entropy "
                        "(default: bce)")
    p.add_argument("--class_balance", action="store_true",
                   help="weight each slice's loss by the inverse frequency of its class in the training set "
                        "(default: off)")
    add_optimisation_args(p, batch_size=Config.batch_size, unit="slices")
    add_device_args(p)
    add_amp_arg(p)
    add_seed_args(p)
    return p


def main(args: argparse.Namespace) -> RunDir | None:
    return train_classifier(config_from_args(Config, args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
