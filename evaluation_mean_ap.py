"""Mask and box average precision of a lesion segmentation model over IoU 0.50:0.05:0.95.

Canonical command (the original README's, with the phantom test data)::

    python evaluation_mean_ap.py --backbone_name resnet18 --ckpt model.pth --mask_type merge \
        --truncation 1 --rpn_nms_th 0.75 --roi_nms_th 0.75 --confidence_th 0.75 \
        --test_data_dir data/phantom/seg/test

Prints AP@0.5, AP@0.75, mAP@[0.5:0.95] and AP at each threshold, overall and per class, for masks
(segm) and boxes (bbox), and writes them to ``<save_dir>/metrics.json``. ``--style coco`` (default)
is dataset-level COCO AP, equal to pycocotools' COCOeval; ``--style per_image`` is the original
repository's per-image-averaged AP, for comparison with its published table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from datasets.conventions import class_names_for
from datasets.segmentation import CNCBSegmentationDataset
from inference_segmentation import add_model_args, load_segmentation_model
from utils.classification_metrics import to_jsonable
from utils.cli import add_device_args, probability, resolve_device, run_cli
from utils.mean_ap import mean_average_precision


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="segmentation checkpoint (required)")
    p.add_argument("--test_data_dir", default="data/phantom/seg/test", help="data root (default: data/phantom/seg/test)")
    p.add_argument("--test_imgs_dir", default="imgs", help="image folder inside the data root (default: imgs)")
    p.add_argument("--gt_dir", default="masks", help="mask folder inside the data root (default: masks)")
    add_model_args(p)
    p.add_argument("--mask_logits_th", type=probability, default=0.5, help="mask probability threshold (default: 0.5)")
    p.add_argument("--style", default="coco", choices=["coco", "per_image"],
                   help="coco: dataset-level COCO AP; per_image: the original's per-image average (default: coco)")
    p.add_argument("--save_dir", default="runs/evaluation", help="where metrics.json goes (default: runs/evaluation)")
    add_device_args(p)
    return p


@torch.inference_mode()
def predict_dataset(model, dataset, *, device: torch.device) -> tuple[list[dict], list[dict]]:
    """Model outputs and targets for every slice of ``dataset`` (on the CPU)."""
    predictions, targets = [], []
    for image, target in tqdm(dataset, desc="slices"):
        predictions.append({k: v.cpu() for k, v in model([image.to(device)])[0].items()})
        targets.append(target)
    return predictions, targets


def evaluate(predictions: list[dict], targets: list[dict], *, style: str, mask_threshold: float) -> dict:
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
    return f"{name:<22}{fmt(r['AP50']):>8}{fmt(r['AP75']):>8}{fmt(r['mAP']):>8}  " + " ".join(fmt(v).rjust(6) for v in r["AP"])


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model, ckpt = load_segmentation_model(args, device)
    mask_type = args.mask_type or ckpt.get("mask_type") or "both"
    dataset = CNCBSegmentationDataset(args.test_data_dir, imgs_dir=args.test_imgs_dir, masks_dir=args.gt_dir,
                                      mask_type=mask_type)
    predictions, targets = predict_dataset(model, dataset, device=device)
    results = evaluate(predictions, targets, style=args.style, mask_threshold=args.mask_logits_th)
    print(f"{len(dataset)} slices, style {args.style}, mask_type {mask_type}")
    print(format_results(results, class_names_for(mask_type)))
    out = Path(args.save_dir) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_jsonable({"checkpoint": str(args.ckpt), "mask_type": mask_type, **results}), indent=1))
    print(f"metrics -> {out}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
