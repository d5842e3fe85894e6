"""Mask and box AP from model outputs, end to end: ours against pycocotools and faster-coco-eval.

Every contender starts from the same torchvision-style prediction/target dicts (masks as model
outputs: probabilities [N, 1, H, W] or binary) and ends with AP@[.5:.95], AP50 and AP75. The peers'
time includes binarising the masks, RLE-encoding them (Fortran-ordered uint8, as their ``encode``
needs), building their COCO objects, and evaluate/accumulate/summarize. The values are checked
against pycocotools (1e-6) before the ratios are printed.

Run from the repository root::

    python -m benchmarks.bench_mean_ap                    # 1,000 slices of 512x512: ~1 min, ~5 GB RAM
    python -m benchmarks.bench_mean_ap --n_images 100     # quick run
    python -m benchmarks.bench_mean_ap --mask_format binary

The probability masks of 1,000 slices take 5 GB (5 predictions x 1 MB each); ``--mask_format
binary`` uses UInt8 masks (1.3 GB). Absolute times depend on the machine, printed first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import time

import numpy as np
import torch

from utils.mean_ap import mean_average_precision

LUNGS = ((0.5, 0.3, 0.32, 0.17), (0.5, 0.7, 0.32, 0.17))  # (cy, cx, ry, rx) as fractions of the slice


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    parser.add_argument("--n_images", type=int, default=1000, help="number of slices (default: 1000)")
    parser.add_argument("--size", type=int, default=512, help="slice height and width in pixels (default: 512)")
    parser.add_argument("--mask_format", choices=("prob", "binary"), default="prob",
                        help="prediction masks as Float32 probabilities [N, 1, H, W] or UInt8 0/1 (default: prob)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per contender, best kept (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic slices (default: 0)")
    parser.add_argument("--skip_faster_coco_eval", action="store_true",
                        help="time pycocotools only as the peer (default: off, both peers are timed)")
    return parser


# --------------------------------------------------------------------------- synthetic model outputs

def _draw_ellipse(out: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float, *,
                  soft: bool) -> list[float]:
    """Draw a rotated elliptic blob into Float32[H, W] ``out`` (soft-edged probabilities or 0/1), only
    inside its window; return the xyxy box of its pixels above 0.5."""
    size = out.shape[0]
    r = max(ry, rx) + 3
    y0, y1 = int(np.clip(cy - r, 0, size - 1)), int(np.clip(cy + r + 1, 1, size))
    x0, x1 = int(np.clip(cx - r, 0, size - 1)), int(np.clip(cx + r + 1, 1, size))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (yy - cy) * c + (xx - cx) * s, -(yy - cy) * s + (xx - cx) * c
    rho = np.sqrt((u / ry) ** 2 + (v / rx) ** 2)  # 1 on the boundary
    blob = 1 / (1 + np.exp(2 * (rho - 1) * min(ry, rx))) if soft else (rho <= 1).astype(np.float32)
    out[y0:y1, x0:x1] = blob
    ys, xs = np.nonzero(blob > 0.5)
    if ys.size == 0:
        return [0.0, 0.0, 1.0, 1.0]
    return [float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1)]


def _lesion(rng, size: int) -> tuple:
    cy, cx, ry, rx = LUNGS[rng.integers(2)]
    t, a = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
    center = (size * (cy + 0.8 * a * ry * np.sin(t)), size * (cx + 0.8 * a * rx * np.cos(t)))
    return (*center, *(size * rng.uniform(0.012, 0.07, 2)), rng.uniform(0, np.pi))


def _jittered(rng, lesion: tuple) -> tuple:
    cy, cx, ry, rx, angle = lesion
    return (cy + rng.normal(0, 0.15 * ry), cx + rng.normal(0, 0.15 * rx), ry * rng.uniform(0.75, 1.25),
            rx * rng.uniform(0.75, 1.25), angle + rng.normal(0, 0.3))


def _jitter_box(rng, box: list[float]) -> list[float]:
    b = np.asarray(box) + rng.normal(0, 1.0, 4)
    return [min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])]


def make_slice(rng, *, size: int, mask_format: str) -> tuple[dict, dict]:
    """One slice: about 2 GT lesions (none on 15% of slices) and 5 predictions (hits, duplicates and
    false positives), as model outputs."""
    lesions = [] if rng.random() < 0.15 else [_lesion(rng, size) for _ in range(int(rng.integers(1, 5)))]
    gt_labels = rng.integers(1, 3, len(lesions))
    shapes, labels, scores = [], [], []
    for lesion, label in zip(lesions, gt_labels):
        for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
            shapes.append(_jittered(rng, lesion))
            labels.append(label if rng.random() < 0.9 else 3 - label)
            scores.append(rng.uniform(0.4, 1.0))
    while len(shapes) < 5:
        shapes.append(_lesion(rng, size))
        labels.append(rng.integers(1, 3))
        scores.append(rng.uniform(0.05, 0.8))
    gt = np.zeros((len(lesions), size, size), np.float32)
    gt_boxes = [_draw_ellipse(gt[i], *lesion, soft=False) for i, lesion in enumerate(lesions)]
    probs = np.zeros((len(shapes), 1, size, size), np.float32)  # model output layout [N, 1, H, W]
    boxes = [_jitter_box(rng, _draw_ellipse(probs[i, 0], *shape, soft=True)) for i, shape in enumerate(shapes)]
    masks = torch.from_numpy(probs) if mask_format == "prob" else torch.from_numpy(probs > 0.5).to(torch.uint8)
    prediction = {"boxes": torch.tensor(boxes, dtype=torch.float32), "masks": masks,
                  "scores": torch.tensor(scores, dtype=torch.float32),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
    target = {"boxes": torch.tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(gt_labels, dtype=torch.int64), "masks": torch.from_numpy(gt.astype(np.uint8))}
    return prediction, target


def make_dataset(*, n_images: int, size: int, mask_format: str, seed: int) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    pairs = [make_slice(rng, size=size, mask_format=mask_format) for _ in range(n_images)]
    return [p for p, _ in pairs], [t for _, t in pairs]


# --------------------------------------------------------------------------- the contenders

def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    return [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in boxes.double().tolist()]


def _fortran(masks: np.ndarray) -> np.ndarray:
    """UInt8[H, W, K] in Fortran order from Bool/UInt8[K, H, W], the layout COCO's encode wants."""
    masks = masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8, copy=False)
    return np.asfortranarray(masks.transpose(1, 2, 0))


def coco_inputs(predictions, targets, *, iou_type: str, mask_api, mask_threshold: float = 0.5):
    """COCO ground-truth dataset and results list, masks RLE-encoded with ``mask_api.encode``."""
    images, anns, results = [], [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        images.append({"id": i + 1, "height": t["masks"].shape[-2], "width": t["masks"].shape[-1]})
        gt_boxes, dt_boxes = _xywh(t["boxes"]), _xywh(p["boxes"])
        if iou_type == "segm":
            gt_rles = mask_api.encode(_fortran(t["masks"].numpy())) if len(gt_boxes) else []
            gt_areas = mask_api.area(gt_rles) if len(gt_boxes) else []
            binary = p["masks"][:, 0].numpy() > mask_threshold  # numpy: torch's threads thrash on 2 cores
            dt_rles = mask_api.encode(_fortran(binary)) if len(dt_boxes) else []
        for j, (box, label) in enumerate(zip(gt_boxes, t["labels"].tolist())):
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": label, "iscrowd": 0, "bbox": box}
            if iou_type == "segm":
                ann.update(segmentation=gt_rles[j], area=float(gt_areas[j]))
            else:
                ann["area"] = box[2] * box[3]
            anns.append(ann)
        for j, (score, label) in enumerate(zip(p["scores"].tolist(), p["labels"].tolist())):
            key, value = ("segmentation", dt_rles[j]) if iou_type == "segm" else ("bbox", dt_boxes[j])
            results.append({"image_id": i + 1, "category_id": label, "score": score, key: value})
    labels = sorted({c for d in list(predictions) + list(targets) for c in d["labels"].tolist()})
    return {"images": images, "annotations": anns, "categories": [{"id": c} for c in labels]}, results


def run_pycocotools(predictions, targets, iou_type: str) -> np.ndarray:
    from pycocotools import mask as mask_api
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    dataset, results = coco_inputs(predictions, targets, iou_type=iou_type, mask_api=mask_api)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:3])


def run_faster_coco_eval(predictions, targets, iou_type: str) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask as mask_api
    dataset, results = coco_inputs(predictions, targets, iou_type=iou_type, mask_api=mask_api)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(dataset)
        evaluator = COCOeval_faster(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:3])


def run_ours(predictions, targets, iou_type: str) -> np.ndarray:
    out = mean_average_precision(predictions, targets, iou_type=iou_type, style="coco")
    return np.array([out["mAP"], out["AP50"], out["AP75"]])


# --------------------------------------------------------------------------- timing and report

def best_time(fn, repeat: int) -> tuple[float, np.ndarray]:
    """Fastest of ``repeat`` runs of ``fn()`` in seconds, and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def compare(predictions, targets, *, iou_type: str, repeat: int, peers: dict) -> None:
    """Time every contender on one IoU type, check the values against pycocotools, print times and ratios."""
    ours_s, ours = best_time(lambda: run_ours(predictions, targets, iou_type), repeat)
    line = f"{iou_type:5s} ours {ours_s:7.3f} s"
    for name, fn in peers.items():
        peer_s, values = best_time(lambda: fn(predictions, targets, iou_type), repeat)
        diff = np.abs(ours - values).max()
        if name == "pycocotools":
            assert diff < 1e-6, f"{iou_type}: ours {ours} differs from pycocotools {values} by {diff:.2e}"
        line += f" | {name} {peer_s:7.3f} s, ratio {peer_s / ours_s:4.1f}x (max |diff| {diff:.1e})"
    print(line)
    print(f"      AP@[.5:.95] {ours[0]:.4f}  AP50 {ours[1]:.4f}  AP75 {ours[2]:.4f}")


def main(args: argparse.Namespace) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    start = time.perf_counter()
    predictions, targets = make_dataset(n_images=args.n_images, size=args.size, mask_format=args.mask_format,
                                        seed=args.seed)
    n_gt, n_pred = sum(len(t["labels"]) for t in targets), sum(len(p["labels"]) for p in predictions)
    print(f"{args.n_images} slices {args.size}x{args.size}, {n_gt} GT lesions, {n_pred} predictions, "
          f"{args.mask_format} masks (made in {time.perf_counter() - start:.1f} s)")
    peers = {"pycocotools": run_pycocotools}
    if not args.skip_faster_coco_eval:
        peers["faster-coco-eval"] = run_faster_coco_eval
    print("ratio = the peer's time / our time (above 1: ours is faster); |diff| = largest AP difference to ours")
    for iou_type in ("segm", "bbox"):
        compare(predictions, targets, iou_type=iou_type, repeat=args.repeat, peers=peers)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
