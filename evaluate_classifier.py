"""Evaluate a COVID-CT-Mask-Net slice classifier: confusion matrix, sensitivity, accuracy, AUC, plots.

Canonical command (the original README's, with the phantom test data)::

    python evaluate_classifier.py --ckpt cls.pth --truncation 1 --num_class 2 --backbone_name resnet34 \
        --roi_batch_size 128 --device cpu --s_features 512 --test_data_dir data/phantom/cls/test

Class probabilities are the softmax of the model's three logits (Control, CP, COVID-19); the predicted
class is their arg-max. The printed report has the original's layout (raw 3x3 confusion matrix with
rows true Control/CP/COVID-19, the row-normalised class sensitivity, overall accuracy) and adds
per-class specificity, PPV, F1 and one-vs-rest ROC AUC with their macro mean. ``--aggregate scan``
(or ``patient``) also averages the slice probabilities of each scan (patient) and reports the same
table at that level. ``--save_dir`` receives predictions.csv (one row per slice), predictions_<level>.csv
when aggregating, metrics.json, confusion_matrix.png and roc.png (at the reported level). The pipeline
is ``models.mask_net.workflows.evaluate_classifier``.
"""
from __future__ import annotations

import argparse

from models.mask_net.workflows.classifier_evaluation import ClassifierEvalConfig as Config
from models.mask_net.workflows.classifier_evaluation import evaluate_classifier
from models.mask_net.workflows.cli import CLASSIFIER_FLAGS, add_model_args
from utils.cli import (
    add_amp_arg,
    add_device_args,
    add_output_args,
    add_workers_args,
    config_from_args,
    positive_int,
    run_cli,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="classification checkpoint (from train_classifier.py) to evaluate (required)")
    p.add_argument("--test_data_dir", default=Config.test_data_dir,
                   help=f"folder of test slices (default: {Config.test_data_dir})")
    p.add_argument("--split_file", default=None,
                   help="COVIDx-CT split file listing the slices of --test_data_dir to use (default: every image in "
                        "the folder)")
    add_model_args(p, names=CLASSIFIER_FLAGS)
    p.add_argument("--batch_size", type=positive_int, default=Config.batch_size,
                   help=f"slices per forward pass (default: {Config.batch_size})")
    p.add_argument("--aggregate", default="slice", choices=["slice", "scan", "patient"],
                   help="also report at scan or patient level by averaging slice probabilities (default: slice)")
    p.add_argument("--crop_to_box", action="store_true", help="crop slices to the split file's lung box (default: off)")
    add_output_args(p, default=Config.save_dir, what="predictions.csv, metrics.json and plots")
    p.add_argument("--model_name", default=None, help="title used in the plots (default: the checkpoint's file name)")
    add_workers_args(p)
    add_amp_arg(p, inference=True)
    add_device_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    return evaluate_classifier(config_from_args(Config, args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
