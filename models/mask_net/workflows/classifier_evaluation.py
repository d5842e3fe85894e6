"""Evaluate a COVID-CT-Mask-Net slice classifier: confusion matrix, sensitivity, accuracy, AUC, plots.

Class probabilities are the softmax of the model's three logits (Control, CP, COVID-19); the predicted
class is their arg-max. :func:`evaluate_classifier` prints the original's report (raw 3x3 confusion
matrix with rows true Control/CP/COVID-19, the row-normalised class sensitivity, overall accuracy) plus
per-class specificity, PPV, F1 and one-vs-rest ROC AUC with their macro mean. ``aggregate`` ``scan``
(or ``patient``) also averages the slice probabilities of each scan (patient) and reports the same
table at that level. ``save_dir`` receives predictions.csv (one row per slice), predictions_<level>.csv
when aggregating, metrics.json, confusion_matrix.png and roc.png (at the reported level).
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.classification import SliceClassificationDataset
from datasets.conventions import CLASS_NAMES
from models.mask_net.covid_mask_net import CLASSIFIER_BUILDER
from models.mask_net.fast.poolers import use_gather_poolers
from models.mask_net.workflows.model_io import load_model_for_inference
from utils.amp import for_inference
from utils.classification_metrics import (
    aggregate_probabilities,
    classification_report,
    format_report,
    roc_curve,
    to_jsonable,
)
from utils.cli import resolve_device
from utils.plots import confusion_matrix_plot, roc_plot


@dataclass(kw_only=True)
class ClassifierSettings:
    """The classifier's model settings; None means "from the checkpoint" (a given architecture setting
    must match it, a given threshold replaces the checkpoint's)."""

    backbone_name: str | None = None
    truncation: int | None = None
    num_classes: int | None = None
    roi_batch_size: int | None = None
    s_features: int | None = None
    score_columns: str | None = None
    rpn_nms_th: float | None = None
    roi_nms_th: float | None = None


@dataclass(kw_only=True)
class ClassifierEvalConfig(ClassifierSettings):
    """Settings of :func:`evaluate_classifier`.

    Attributes:
        ckpt: the classification checkpoint.
        test_data_dir: folder of test slices; ``split_file`` (COVIDx-CT) selects some of them, or None.
        batch_size, num_workers, no_progress, device: how the slices are run.
        amp: run the model in mixed precision (:func:`utils.amp.for_inference`).
        aggregate: slice, scan or patient: the level reported besides the slices.
        crop_to_box: crop slices to the split file's lung box.
        save_dir: folder of the predictions, metrics.json and plots.
        model_name: title of the plots (None: the checkpoint's file name).
    """

    ckpt: str
    test_data_dir: str = "data/phantom/cls/test"
    split_file: str | None = None
    batch_size: int = 8
    aggregate: str = "slice"
    crop_to_box: bool = False
    save_dir: str = "runs/evaluate_classifier"
    model_name: str | None = None
    num_workers: int = 0
    amp: bool = False
    no_progress: bool = False
    device: str = "cpu"


def load_classifier(path: str, *, flags: dict, device: torch.device,
                    amp: bool = False) -> tuple[torch.nn.Module, dict]:
    """Rebuild a classification checkpoint's model strictly, in eval mode, with threshold settings applied
    (under :func:`utils.amp.for_inference` with ``amp``). In float32 on CPU its RoI pooler is the
    gather form the trainers use (:func:`models.mask_net.fast.poolers.use_gather_poolers`: the same
    features to float rounding; torchvision's CPU ``roi_align`` runs on one thread and took 45 % of
    the classifier's time on the lung slices of a 512 x 512 scan).

    Args:
        path: the classification checkpoint.
        flags: model settings (:class:`ClassifierSettings` names); None values come from the checkpoint.
        device: target device.

    Raises:
        ValueError: when ``path`` is not a classification checkpoint or a setting contradicts it.
    """
    model, ckpt = load_model_for_inference(path, device=device, flags=flags, builder=CLASSIFIER_BUILDER,
                                           kind="classification")
    if device.type == "cpu" and not amp:
        use_gather_poolers(model.roi_heads)
    return for_inference(model, device, amp), ckpt


def collate_slices(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, list[dict]]:
    """Batch as ``(list of Float32[3, H_i, W_i], Int64[B], metas)``: slices (e.g. crops) may differ in size,
    the model's transform resizes each one."""
    images, labels, metas = zip(*batch)
    return list(images), torch.tensor(labels, dtype=torch.int64), list(metas)


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
        title = f"{title}: ROC (macro AUC {report['macro_auc']:.3f})"
        paths.append(roc_plot(curves, save_dir / "roc.png", title=title))
    else:
        print("no ROC curve: every case has the same true class")
    return paths


def evaluation_loader(config: ClassifierEvalConfig) -> DataLoader:
    """Test loader in file order."""
    dataset = SliceClassificationDataset(config.test_data_dir, split_file=config.split_file,
                                         crop_to_box=config.crop_to_box)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers,
                      collate_fn=collate_slices)


def evaluate_classifier(config: ClassifierEvalConfig) -> dict:
    """Evaluate the checkpoint; prints the reports, writes predictions, metrics.json and plots.

    Returns:
        ``{"slice": report}`` and, when aggregating, the report at that level.

    Raises:
        ValueError: for a checkpoint of another kind or a setting that contradicts it.
    """
    device = resolve_device(config.device)
    model, _ = load_classifier(config.ckpt, flags=asdict(config), device=device, amp=config.amp)
    probs, labels, metas = predict(model, evaluation_loader(config), device=device, progress=not config.no_progress)
    save_dir = Path(config.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    write_slice_csv(save_dir / "predictions.csv", probs, labels, metas)
    results = {"slice": classification_report(labels, probs)}
    print(format_report(results["slice"], class_names=CLASS_NAMES, level="slice"))
    level, level_probs, level_labels = config.aggregate, probs, labels
    if level != "slice":
        level_probs, level_labels, keys = aggregate_probabilities(probs, labels, group_keys(metas, level))
        write_group_csv(save_dir / f"predictions_{level}.csv", level, level_probs, level_labels, keys)
        results[level] = classification_report(level_labels, level_probs)
        print(format_report(results[level], class_names=CLASS_NAMES, level=level))
    title = config.model_name or Path(config.ckpt).stem
    save_plots(save_dir, results[level], level_labels, level_probs, title=f"{title} ({level})")
    metrics = {"ckpt": str(config.ckpt), "test_data_dir": str(config.test_data_dir), "class_names": list(CLASS_NAMES),
               "probabilities": "softmax of the three logits", "level": level, **results}
    (save_dir / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    print(f"predictions, metrics.json and plots written to {save_dir}")
    return results
