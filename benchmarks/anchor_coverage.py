"""Anchor coverage: how well the RPN's anchors fit the lesion boxes at the training resolution.

For every ground-truth box of a CNCB slice folder, the box is scaled as the model's transform scales
it (short side to ``--image_size``, long side capped at 2x), the anchors are built by the model's own
anchor generator over the feature maps of the chosen backbone and truncation, and the box's best IoU
with any anchor is measured. The RPN trains a box only through anchors with IoU >= 0.7 (its default
positive threshold) or, failing those, its best anchors; a box whose best IoU is low gets a poor
proposal start.

Run from the repository root::

    python -m benchmarks.anchor_coverage --data_dir data/phantom/seg/train --image_size 256
    python -m benchmarks.anchor_coverage --data_dir data/phantom/seg/train --image_size 256 --truncation 2
    python -m benchmarks.anchor_coverage --data_dir data/phantom/seg/train --anchor_sizes 4 8 16 32 64 --out a.json

Without the anchor flags it measures the model's current defaults (the original's anchors).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torchvision.ops import box_iou

from datasets.conventions import MASK_TYPE_LABELS
from datasets.segmentation import DEFAULT_MIN_AREA, CNCBSegmentationDataset
from models.mask_net.mask_rcnn import COVID_DEFAULTS, MaskRCNN, maskrcnn_resnet_fpn
from models.mask_net.workflows.cli import BACKBONES
from utils.cli import positive_int, run_cli
from utils.paths import refuse_overwriting_inputs

IOU_LEVELS = (0.7, 0.5, 0.3)
# Size buckets on sqrt(box area) in pixels at the training resolution: (name, low inclusive, high exclusive).
SIZE_BUCKETS = (("<8", 0.0, 8.0), ("8-16", 8.0, 16.0), ("16-32", 16.0, 32.0), (">=32", 32.0, math.inf))
SMALL_SIDE = 16.0


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_model(*, backbone_name: str, truncation: int, image_size: int, anchor_sizes, aspect_ratios) -> MaskRCNN:
    """The segmentation model whose transform and anchor generator are measured (random weights, eval mode).

    Args:
        backbone_name, truncation: the backbone, as ``maskrcnn_resnet_fpn``.
        image_size: short side of the resized slices; the long side is capped at 2x.
        anchor_sizes: anchor sizes in input pixels, used on every FPN level.
        aspect_ratios: height / width ratios, combined with every size.
    """
    model = maskrcnn_resnet_fpn(backbone_name=backbone_name, truncation=truncation, num_classes=2,
                                min_size=image_size, max_size=2 * image_size, anchor_sizes=tuple(anchor_sizes),
                                aspect_ratios=tuple(aspect_ratios), with_masks=False)
    return model.eval()


@torch.no_grad()
def model_anchors(model: MaskRCNN, batch_shape: tuple[int, int]) -> torch.Tensor:
    """The anchors the model's RPN uses for a padded batch of ``batch_shape`` (h, w).

    The backbone runs once on zeros to get the feature-map sizes; the RPN's anchor generator then
    lays the anchors out over them.

    Returns:
        FloatTensor[A, 4] xyxy in input pixels (resized-image coordinates).
    """
    features = model.backbone(torch.zeros(1, 3, *batch_shape))
    maps = [torch.zeros(1, 1, *f.shape[-2:]) for f in features.values()]
    return model.rpn.anchor_generator(tuple(batch_shape), maps)


@torch.no_grad()
def scale_to_training(model: MaskRCNN, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Boxes as the model's transform resizes them, and the padded batch shape of the image alone.

    Args:
        image: FloatTensor[3, H, W] in [0, 1].
        boxes: FloatTensor[N, 4] xyxy in image pixels.

    Returns:
        FloatTensor[N, 4] xyxy at the training resolution, and the (h, w) of the padded batch.
    """
    batch, targets = model.transform([image], [{"boxes": boxes}])
    return targets[0]["boxes"], tuple(batch.tensors.shape[-2:])


def best_anchor_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Best IoU of each box (FloatTensor[N, 4] xyxy) with any anchor (FloatTensor[A, 4]): FloatTensor[N]."""
    if boxes.shape[0] == 0 or anchors.shape[0] == 0:
        return boxes.new_zeros(boxes.shape[0])
    return box_iou(boxes, anchors).max(dim=1).values


def box_sides(boxes: torch.Tensor) -> torch.Tensor:
    """sqrt(area) of FloatTensor[N, 4] xyxy boxes: FloatTensor[N] in pixels."""
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()


def measure(dataset: CNCBSegmentationDataset, model: MaskRCNN) -> tuple[torch.Tensor, torch.Tensor]:
    """Box sides and best-anchor IoUs over all slices of ``dataset``.

    Returns:
        sides FloatTensor[N] (px at the training resolution) and best IoUs FloatTensor[N] in [0, 1].
    """
    cache: dict[tuple, torch.Tensor] = {}
    sides, best = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        boxes, batch_shape = scale_to_training(model, image, target["boxes"])
        if batch_shape not in cache:
            cache[batch_shape] = model_anchors(model, batch_shape)
        sides.append(box_sides(boxes))
        best.append(best_anchor_iou(boxes, cache[batch_shape]))
    return torch.cat(sides) if sides else torch.zeros(0), torch.cat(best) if best else torch.zeros(0)


def _fraction(mask: torch.Tensor) -> float | None:
    return float(mask.float().mean()) if mask.numel() else None


def _quantile(values: torch.Tensor, q: float) -> float | None:
    return float(torch.quantile(values, q)) if values.numel() else None


def coverage(best: torch.Tensor) -> dict:
    """Count and fraction of best IoUs (FloatTensor[N]) at or above each of ``IOU_LEVELS`` (None when N = 0)."""
    return {"n_boxes": int(best.numel()), **{f"iou>={t}": _fraction(best >= t) for t in IOU_LEVELS}}


def summarize(sides: torch.Tensor, best: torch.Tensor) -> dict:
    """The report of :func:`main` from box sides and best IoUs (both FloatTensor[N])."""
    buckets = {name: coverage(best[(sides >= low) & (sides < high)]) for name, low, high in SIZE_BUCKETS}
    return {
        "n_boxes": int(sides.numel()),
        "side_quartiles": [_quantile(sides, q) for q in (0.25, 0.5, 0.75)],
        "frac_side_under_16": _fraction(sides < SMALL_SIDE),
        "median_best_iou": _quantile(best, 0.5),
        "coverage": coverage(best),
        "coverage_by_side": buckets,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(report: dict) -> None:
    """Print the report of :func:`main` as a few lines and a table."""
    print(f"setting: {report['setting']}")
    quartiles = ", ".join(_fmt(q) for q in report["side_quartiles"])
    print(f"boxes: {report['n_boxes']}; sqrt(area) px quartiles (25/50/75): {quartiles}; "
          f"under {SMALL_SIDE:g} px: {_fmt(report['frac_side_under_16'])}; "
          f"median best-anchor IoU: {_fmt(report['median_best_iou'])}")
    levels = [f"iou>={t}" for t in IOU_LEVELS]
    print(f"{'boxes':>8} {'n':>6} " + " ".join(f"{name:>9}" for name in levels))
    rows = {"all": report["coverage"], **report["coverage_by_side"]}
    for name, row in rows.items():
        print(f"{name:>8} {row['n_boxes']:>6} " + " ".join(f"{_fmt(row[level]):>9}" for level in levels))


def main(args: argparse.Namespace) -> dict:
    """Measure the anchor coverage of the boxes under ``args.data_dir``.

    Returns:
        ``setting`` (the flags measured), ``n_boxes``, ``side_quartiles`` (25/50/75 % of sqrt(area), px at
        the training resolution), ``frac_side_under_16``, ``median_best_iou``, ``coverage`` (``n_boxes`` and
        the fraction with best IoU ``iou>=0.7``, ``iou>=0.5``, ``iou>=0.3``) and ``coverage_by_side`` (the
        same per bucket ``<8``, ``8-16``, ``16-32``, ``>=32``). Fractions are in [0, 1], None without boxes.
    """
    if args.out:
        refuse_overwriting_inputs([args.data_dir], [args.out])
    dataset = CNCBSegmentationDataset(args.data_dir, mask_type=args.mask_type, min_area=args.min_area)
    model = build_model(backbone_name=args.backbone_name, truncation=args.truncation, image_size=args.image_size,
                        anchor_sizes=args.anchor_sizes, aspect_ratios=args.aspect_ratios)
    report = {"setting": {k: getattr(args, k) for k in ("data_dir", "backbone_name", "truncation", "image_size",
                                                         "anchor_sizes", "aspect_ratios", "mask_type", "min_area")},
              **summarize(*measure(dataset, model))}
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.out}")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    parser.add_argument("--data_dir", default="data/phantom/seg/train",
                        help="CNCB slice folder with imgs/ and masks/ (default: data/phantom/seg/train)")
    parser.add_argument("--image_size", type=positive_int, default=512,
                        help="short side the model resizes slices to; the long side is capped at 2x (default: 512)")
    parser.add_argument("--backbone_name", choices=BACKBONES, default="resnet18",
                        help="ResNet backbone (default: resnet18)")
    parser.add_argument("--truncation", type=int, choices=[0, 1, 2], default=1,
                        help="ResNet18/34: 0 full, 1 without layer4, 2 without layer3 and layer4 (default: 1)")
    parser.add_argument("--anchor_sizes", type=positive_int, nargs="+", default=list(COVID_DEFAULTS["anchor_sizes"]),
                        help=f"anchor sizes in input pixels, on every FPN level "
                             f"(default: {COVID_DEFAULTS['anchor_sizes']})")
    parser.add_argument("--aspect_ratios", type=positive_float, nargs="+",
                        default=list(COVID_DEFAULTS["aspect_ratios"]),
                        help=f"anchor height / width ratios (default: {COVID_DEFAULTS['aspect_ratios']})")
    parser.add_argument("--mask_type", choices=sorted(MASK_TYPE_LABELS), default="both",
                        help="lesion classes whose instances are measured (default: both)")
    parser.add_argument("--min_area", type=positive_int, default=DEFAULT_MIN_AREA,
                        help=f"smallest instance kept, in original pixels (default: {DEFAULT_MIN_AREA})")
    parser.add_argument("--out", default=None, help="also write the report as JSON to this file (default: none)")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser())
