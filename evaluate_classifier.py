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
when aggregating, metrics.json, confusion_matrix.png and roc.png (at the reported level).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.classification import SliceClassificationDataset
from datasets.conventions import CLASS_NAMES
from utils import model_io
from utils.classification_metrics import (
    aggregate_probabilities,
    classification_report,
    format_report,
    roc_curve,
    to_jsonable,
)
from utils.cli import add_device_args, non_negative_int, positive_int, probability, resolve_device, run_cli
from utils.plots import confusion_matrix_plot, roc_plot

BUILDER = "models.mask_net.covid_mask_net"
# Flags that fix the architecture: when given they must match the checkpoint.
ARCHITECTURE_FLAGS = ("backbone_name", "truncation", "num_classes", "roi_batch_size", "s_features")
# Flags that may change a checkpoint's inference setting -> builder keyword.
THRESHOLD_FLAGS = {"rpn_nms_th": "rpn_nms_thresh", "roi_nms_th": "box_nms_thresh"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="classification checkpoint (from train_classifier.py) to evaluate (required)")
    p.add_argument("--test_data_dir", default="data/phantom/cls/test", help="folder of test slices (default: data/phantom/cls/test)")
    p.add_argument("--split_file", default=None,
                   help="COVIDx-CT split file listing the slices of --test_data_dir to use (default: every image in the folder)")
    add_architecture_args(p)
    p.add_argument("--batch_size", type=positive_int, default=8, help="slices per forward pass (default: 8)")
    p.add_argument("--aggregate", default="slice", choices=["slice", "scan", "patient"],
                   help="also report at scan or patient level by averaging slice probabilities (default: slice)")
    p.add_argument("--crop_to_box", action="store_true", help="crop slices to the split file's lung box (default: off)")
    p.add_argument("--save_dir", default="runs/evaluate_classifier",
                   help="folder for predictions.csv, metrics.json and plots (default: runs/evaluate_classifier)")
    p.add_argument("--model_name", default=None, help="title used in the plots (default: the checkpoint's file name)")
    p.add_argument("--num_workers", type=non_negative_int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar (default: shown)")
    add_device_args(p)
    return p


def add_architecture_args(p: argparse.ArgumentParser) -> None:
    """Model flags shared with train_classifier.py; None means "take it from the checkpoint"."""
    p.add_argument("--backbone_name", default=None, choices=["resnet18", "resnet34", "resnet50"],
                   help="backbone; must match the checkpoint (default: from the checkpoint)")
    p.add_argument("--truncation", type=int, default=None, choices=[0, 1, 2],
                   help="ResNet18/34 truncation; must match the checkpoint (default: from the checkpoint)")
    p.add_argument("--num_classes", "--num_class", dest="num_classes", type=int, default=None, choices=[2, 3],
                   help="classes of the segmentation model incl. background: 2 merge/ggo, 3 both (default: from the checkpoint)")
    p.add_argument("--roi_batch_size", type=positive_int, default=None,
                   help="B, the ranked detections per slice that S reads (default: from the checkpoint)")
    p.add_argument("--s_features", type=positive_int, default=None, help="hidden width of S (default: from the checkpoint)")
    p.add_argument("--rpn_nms_th", type=probability, default=None, help="RPN NMS IoU threshold (default: from the checkpoint)")
    p.add_argument("--roi_nms_th", type=probability, default=None,
                   help="per-class NMS IoU threshold of the RoI detections (default: from the checkpoint)")


def check_architecture(path: str, builder_kwargs: dict, flags: dict) -> None:
    """Raise ValueError when a given architecture flag contradicts the checkpoint at ``path``."""
    model_io.check_architecture(path, builder_kwargs, flags, ARCHITECTURE_FLAGS)


def load_classifier(path: str, *, flags: dict, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a classification checkpoint's model strictly, in eval mode, with threshold flags applied.

    Raises:
        ValueError: when ``path`` is not a classification checkpoint or a flag contradicts it.
    """
    return model_io.load_model_for_inference(path, device=device, flags=flags, builder=BUILDER, kind="classification",
                                             architecture_flags=ARCHITECTURE_FLAGS, threshold_flags=THRESHOLD_FLAGS)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, loader, *, device: torch.device, progress: bool = True,
                   max_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Logits of every slice in ``loader``, in eval mode and without gradients.

    Args:
        model: a COVID-CT-Mask-Net classifier, ``model(list of Float[3, H, W]) -> Float[N, 3]`` logits.
        loader: yields ``(images, labels, metas)`` batches of :class:`SliceClassificationDataset`.
        device: where to run.
        progress: show a progress bar.
        max_steps: stop after this many batches (smoke runs); None for all.

    Returns:
        Float32[N, 3] logits and Int64[N] true classes (on the CPU), and the N meta dicts.

    Raises:
        ValueError: when the loader yields nothing.
    """
    was_training = model.training
    model.eval()
    logits, labels, metas = [], [], []
    batches = tqdm(loader, desc="evaluate", disable=not progress, leave=False)
    for _, (images, batch_labels, batch_metas) in zip(range(max_steps or len(loader)), batches):
        logits.append(model([img.to(device, non_blocking=True) for img in images]).float().cpu())
        labels.append(torch.as_tensor(batch_labels).long().cpu())
        metas.extend(batch_metas)
    model.train(was_training)
    if not logits:
        raise ValueError("the data loader yielded no slices")
    return torch.cat(logits), torch.cat(labels), metas


def predict(model: torch.nn.Module, loader, *, device: torch.device, progress: bool = True
            ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Class probabilities (softmax of the three logits) of every slice in ``loader``.

    Returns:
        Float64[N, 3] probabilities, Int64[N] true classes, and the N meta dicts.
    """
    logits, labels, metas = predict_logits(model, loader, device=device, progress=progress)
    return torch.softmax(logits.double(), dim=1).numpy(), labels.numpy(), metas


def group_keys(metas: list[dict], level: str) -> list[str]:
    """Group key of each slice: its patient, or ``patient/scan`` (scan numbers repeat across patients)."""
    if level == "patient":
        return [str(m["patient"]) for m in metas]
    return [f"{m['patient']}/{m['scan']}" for m in metas]


def write_slice_csv(path: Path, probs: np.ndarray, labels: np.ndarray, metas: list[dict]) -> Path:
    """predictions.csv: file, patient, scan, true, predicted and the three probabilities per slice."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "patient", "scan", "true", "predicted", *(f"p_{n}" for n in CLASS_NAMES)])
        for p, y, m in zip(probs, labels, metas):
            writer.writerow([m["file"], m["patient"], m["scan"], int(y), int(p.argmax()), *(f"{v:.6f}" for v in p)])
    return path


def write_group_csv(path: Path, level: str, probs: np.ndarray, labels: np.ndarray, keys: list[str]) -> Path:
    """predictions_<level>.csv: one row per scan or patient with its mean probabilities."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([level, "true", "predicted", *(f"p_{n}" for n in CLASS_NAMES)])
        for p, y, key in zip(probs, labels, keys):
            writer.writerow([key, int(y), int(p.argmax()), *(f"{v:.6f}" for v in p)])
    return path


def save_plots(save_dir: Path, report: dict, labels: np.ndarray, probs: np.ndarray, *, title: str) -> list[Path]:
    """Confusion-matrix PNG and one-vs-rest ROC PNG (classes without both outcomes are left out)."""
    paths = [confusion_matrix_plot(report["confusion_matrix"], save_dir / "confusion_matrix.png",
                                   class_names=CLASS_NAMES, title=f"{title}: confusion matrix")]
    curves = {}
    for k, name in enumerate(CLASS_NAMES):
        if not np.isnan(report["auc"][k]):
            fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
            curves[f"{name} vs rest"] = (fpr, tpr, report["auc"][k])
    if curves:
        paths.append(roc_plot(curves, save_dir / "roc.png", title=f"{title}: ROC (macro AUC {report['macro_auc']:.3f})"))
    else:
        print("no ROC curve: every case has the same true class")
    return paths


def collate_slices(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, list[dict]]:
    """Batch as ``(list of Float32[3, H_i, W_i], Int64[B], metas)``: slices (e.g. crops) may differ in size,
    the model's transform resizes each one."""
    images, labels, metas = zip(*batch)
    return list(images), torch.tensor(labels, dtype=torch.int64), list(metas)


def make_loader(args: argparse.Namespace) -> DataLoader:
    """Test loader in file order."""
    dataset = SliceClassificationDataset(args.test_data_dir, split_file=args.split_file, crop_to_box=args.crop_to_box)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                      collate_fn=collate_slices)


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model, _ = load_classifier(args.ckpt, flags=vars(args), device=device)
    probs, labels, metas = predict(model, make_loader(args), device=device, progress=not args.no_progress)
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    write_slice_csv(save_dir / "predictions.csv", probs, labels, metas)
    results = {"slice": classification_report(labels, probs)}
    print(format_report(results["slice"], class_names=CLASS_NAMES, level="slice"))
    level_probs, level_labels = probs, labels
    if args.aggregate != "slice":
        level_probs, level_labels, keys = aggregate_probabilities(probs, labels, group_keys(metas, args.aggregate))
        write_group_csv(save_dir / f"predictions_{args.aggregate}.csv", args.aggregate, level_probs, level_labels, keys)
        results[args.aggregate] = classification_report(level_labels, level_probs)
        print(format_report(results[args.aggregate], class_names=CLASS_NAMES, level=args.aggregate))
    title = args.model_name or Path(args.ckpt).stem
    save_plots(save_dir, results[args.aggregate], level_labels, level_probs, title=f"{title} ({args.aggregate})")
    metrics = {"ckpt": str(args.ckpt), "test_data_dir": str(args.test_data_dir), "class_names": list(CLASS_NAMES),
               "probabilities": "softmax of the three logits", "level": args.aggregate, **results}
    (save_dir / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    print(f"predictions, metrics.json and plots written to {save_dir}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
