"""Mask and box average precision of a lesion segmentation model over IoU 0.50:0.05:0.95.

:func:`evaluate_mean_ap` reports AP@0.5, AP@0.75, mAP@[0.5:0.95] and AP at each threshold, overall
and per class, for masks (segm) and boxes (bbox), and writes them to ``<save_dir>/metrics.json``.
Style ``coco`` is dataset-level COCO AP, equal to pycocotools' COCOeval; ``per_image`` is the original
repository's per-image-averaged AP, for comparison with its published table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from datasets.conventions import class_names_for
from datasets.segmentation import CNCBSegmentationDataset
from utils.classification_metrics import to_jsonable
from utils.cli import resolve_device
from utils.mean_ap import mean_average_precision

from .segmentation import SegmentationModelConfig, load_segmentation_model


@dataclass(kw_only=True)
class MeanAPConfig(SegmentationModelConfig):
    """Settings of :func:`evaluate_mean_ap`: the model's, the data (``test_data_dir`` with its image and
    mask folders), the AP style (``coco`` or ``per_image``) and the folder of metrics.json."""

    test_data_dir: str = "data/phantom/seg/test"
    test_imgs_dir: str = "imgs"
    gt_dir: str = "masks"
    style: str = "coco"
    save_dir: str = "runs/evaluation"


@torch.inference_mode()
def predict_dataset(model, dataset, *, device: torch.device) -> tuple[list[dict], list[dict]]:
    """Model outputs and targets for every slice of ``dataset`` (on the CPU)."""
    predictions, targets = [], []
    for image, target in tqdm(dataset, desc="slices"):
        predictions.append({k: v.cpu() for k, v in model([image.to(device)])[0].items()})
        targets.append(target)
    return predictions, targets


def average_precision(predictions: list[dict], targets: list[dict], *, style: str, mask_threshold: float) -> dict:
    """AP results for masks and boxes: ``{"segm": {...}, "bbox": {...}}``."""
    return {iou_type: mean_average_precision(predictions, targets, iou_type=iou_type, style=style,
                                             mask_threshold=mask_threshold)
            for iou_type in ("segm", "bbox")}


def format_results(results: dict, class_names: tuple[str, ...]) -> str:
    """Text table: one row per IoU type and class, columns AP50, AP75, mAP and AP at each threshold."""
    thresholds = results["segm"]["iou_thresholds"]
    head = f"{'':<22}{'AP50':>8}{'AP75':>8}{'mAP':>8}  " + " ".join(f"{t:.2f}".rjust(6) for t in thresholds)
    lines = [head]
    for iou_type, res in results.items():
        lines.append(_row(f"{iou_type} all", res))
        for c, per in sorted(res["per_class"].items()):
            name = class_names[c] if c < len(class_names) else str(c)
            lines.append(_row(f"{iou_type} {name}", per))
    return "\n".join(lines)


def _row(name: str, r: dict) -> str:
    fmt = lambda v: f"{v:.4f}" if v == v else "  n/a "  # noqa: E731 (NaN: undefined)
    aps = " ".join(fmt(v).rjust(6) for v in r["AP"])
    return f"{name:<22}{fmt(r['AP50']):>8}{fmt(r['AP75']):>8}{fmt(r['mAP']):>8}  {aps}"


def evaluate_mean_ap(config: MeanAPConfig) -> dict:
    """Evaluate the checkpoint on the data set; prints the table, writes metrics.json, returns the results.

    Raises:
        FileNotFoundError / ValueError: for missing data, a checkpoint of another kind, or a setting
            that contradicts it.
    """
    device = resolve_device(config.device)
    model, ckpt = load_segmentation_model(config, device)
    mask_type = config.mask_type or ckpt.get("mask_type") or "both"
    dataset = CNCBSegmentationDataset(config.test_data_dir, imgs_dir=config.test_imgs_dir, masks_dir=config.gt_dir,
                                      mask_type=mask_type)
    predictions, targets = predict_dataset(model, dataset, device=device)
    results = average_precision(predictions, targets, style=config.style, mask_threshold=config.mask_logits_th)
    print(f"{len(dataset)} slices, style {config.style}, mask_type {mask_type}")
    print(format_results(results, class_names_for(mask_type)))
    out = Path(config.save_dir) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_jsonable({"checkpoint": str(config.ckpt), "mask_type": mask_type, **results}),
                              indent=1))
    print(f"metrics -> {out}")
    return results
