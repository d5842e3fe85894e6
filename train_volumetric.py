"""Train a volumetric (3D, MONAI) task: lung_seg (AH-Net), lesion_seg (SegResNet), covid_cls
(DenseNet121), ssl_pretrain (ViTAutoEnc) or organ_seg (UNETR).

Canonical command::

    python train_volumetric.py --task lesion_seg --datalist data/phantom/volumes/dataset_lesion.json \\
        --data_root data/phantom/volumes --epochs 100 --save_dir runs/lesion_seg

Several processes (GPUs or CPU processes, one or more nodes) with DistributedDataParallel::

    torchrun --nproc_per_node 2 train_volumetric.py --task lung_seg --datalist dataset.json ...

The datalist's ``training`` section is trained on and its ``validation`` section selects
``checkpoint_best.pth`` by the task's metric (mean sliding-window Dice; ROC AUC for covid_cls,
validation loss for ssl_pretrain). The run directory holds args.json, env.txt, metrics.jsonl and the
checkpoints; a checkpoint also stores the task's pre-processing settings, so validate_volumetric.py
and infer_volumetric.py need no pre-processing flags. The training itself is
``models.volumetric.trainer.train``.
"""
from __future__ import annotations

import argparse

from models.volumetric.cli import (
    add_datalist_args,
    add_epochs_arg,
    add_network_args,
    add_optimisation_args,
    add_preprocessing_args,
    add_task_arg,
    add_window_args,
    train_settings,
)
from models.volumetric.trainer import train
from utils.cli import add_amp_arg, add_device_args, add_run_args, add_seed_args, positive_int, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arg(parser, help="volumetric task (required)")
    add_datalist_args(parser, what="with 'training' and 'validation' sections")
    add_epochs_arg(parser)
    add_optimisation_args(parser)
    parser.add_argument("--val_every", type=positive_int, default=1,
                        help="validate every N epochs and at the last one (default: 1)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar (default: shown)")
    add_amp_arg(parser)
    add_window_args(add_preprocessing_args(parser), default="the task's")
    add_network_args(parser)
    add_device_args(parser)
    add_seed_args(parser)
    add_run_args(parser, default_save_dir="runs/volumetric")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Train; returns the last epoch's metrics record (on every rank)."""
    return train(train_settings(args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
