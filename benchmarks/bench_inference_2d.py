"""Per-slice inference time of our Mask R-CNN against torchvision's, with the outputs checked equal.

    python -m benchmarks.bench_inference_2d            (from the repository root)

Torchvision's ``maskrcnn_resnet50_fpn`` and our ``preset="torchvision"`` model share one random
state dict (copied). Both see the same 512x512 slice; with ``--num_classes 2`` untrained heads score
every foreground box near 0.5, so each slice yields the full ``box_detections_per_img`` (100)
detections and masks: the heaviest realistic case (``--detections_per_img`` lowers the cap for all
models alike). Our model runs as its fast inference copy (``models.mask_net.fast.fast_inference_copy``:
BatchNorm folded, channels-last); the model itself is checked to match torchvision within 1e-4 first.
The lightweight COVID-CT-Mask-Net models (ResNet18/34, truncation 0-1-2, covid preset) are timed on
the same slice and reported as ratios to torchvision. Times are medians of interleaved repeats.
Results so far, and the machine they came from: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_iou

from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.fast import fast_inference_copy
from utils.cli import add_device_args, resolve_device

LIGHT_CONFIGS = [(name, t) for name in ("resnet18", "resnet34") for t in (0, 1, 2)]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=512, help="side of the square test slice (default: 512)")
    p.add_argument("--num_classes", type=int, default=2, help="classes incl. background (default: 2)")
    p.add_argument("--detections_per_img", type=int, default=100,
                   help="box_detections_per_img of every model; untrained 2-class heads fill it (default: 100)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model, after one warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and image (default: 0)")
    p.add_argument("--skip_light", action="store_true", help="do not time the lightweight models (default: off)")
    add_device_args(p)
    return p


def time_models(models: dict, image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per slice of each model, runs interleaved so that load changes hit all alike."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():
            model([image])  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model([image])
                if image.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compare(reference: dict, ours: dict) -> dict[str, float]:
    """Agreement of two detection dicts: each reference box against our best same-label box."""
    n_ref, n_ours = reference["boxes"].shape[0], ours["boxes"].shape[0]
    if n_ref == 0 or n_ours == 0:
        return {"detections": n_ref, "ours": n_ours, "min_box_iou": float(n_ref == n_ours),
                "max_score_diff": 0.0, "mean_mask_iou": float(n_ref == n_ours)}
    iou = box_iou(reference["boxes"], ours["boxes"])
    iou[reference["labels"][:, None] != ours["labels"][None, :]] = -1
    best_iou, match = iou.max(dim=1)
    ref_masks, our_masks = reference["masks"][:, 0] > 0.5, ours["masks"][match, 0] > 0.5
    inter = (ref_masks & our_masks).flatten(1).sum(1).float()
    union = (ref_masks | our_masks).flatten(1).sum(1).float()
    mask_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {"detections": n_ref, "ours": n_ours, "min_box_iou": best_iou.min().item(),
            "max_score_diff": (reference["scores"] - ours["scores"][match]).abs().max().item(),
            "mean_mask_iou": mask_iou.mean().item()}


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over boxes, scores and masks of two identically ordered outputs."""
    if a["boxes"].shape != b["boxes"].shape or not torch.equal(a["labels"], b["labels"]):
        return float("inf")
    return max((a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0 for k in ("boxes", "scores", "masks"))


def build_pair(num_classes: int, device: torch.device, detections: int = 100):
    """torchvision's model and ours (torchvision preset) with the same weights, both in eval mode."""
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                   num_classes=num_classes,
                                                                   box_detections_per_img=detections)
    ours = maskrcnn_resnet_fpn(backbone_name="resnet50", truncation=0, num_classes=num_classes, preset="torchvision",
                               box_detections_per_img=detections)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval().to(device), ours.eval().to(device)


def report_agreement(title: str, stats: dict) -> None:
    print(f"{title}: {stats['detections']} vs {stats['ours']} detections, min box IoU {stats['min_box_iou']:.5f}, "
          f"max score diff {stats['max_score_diff']:.2e}, mean mask IoU {stats['mean_mask_iou']:.5f}")


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reference, ours = build_pair(args.num_classes, device, args.detections_per_img)
    image = torch.rand(3, args.image_size, args.image_size, device=device)
    with torch.inference_mode():
        want, exact = reference([image])[0], ours([image])[0]
        fast = fast_inference_copy(ours)
        got = fast([image])[0]
    print(f"device {device}, threads {torch.get_num_threads()}, slice {args.image_size}x{args.image_size}, "
          f"{want['boxes'].shape[0]} detections")
    print(f"ours vs torchvision: max abs diff {max_abs_diff(want, exact):.2e}")
    agreement = compare(want, got)
    report_agreement("fast copy of ours vs torchvision", agreement)
    models = {"torchvision maskrcnn_resnet50_fpn": reference, "ours, torchvision preset (fast)": fast}
    if not args.skip_light:
        models.update(light_models(args.num_classes, device, image, args.detections_per_img))
    times = time_models(models, image, args.repeats)
    base = times["torchvision maskrcnn_resnet50_fpn"]
    print(f"{'model':<40} {'s/slice':>9} {'speed-up vs torchvision':>24}")
    for name, seconds in times.items():
        print(f"{name:<40} {seconds:>9.3f} {base / seconds:>23.2f}x")
    bound = arithmetic_bound(reference, image, base)
    return {"times": times, "agreement": agreement, **bound}


def arithmetic_bound(reference: torch.nn.Module, image: torch.Tensor, seconds: float) -> dict:
    """Print what a speed-up over torchvision asks of the machine: its FLOPs per slice against the
    float32 matrix-multiply rate measured here, the ceiling of direct (non-Winograd) convolution."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        reference([image])
    flops = counter.get_total_flops()
    a = torch.randn(2048, 2048, device=image.device)
    a @ a  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    if image.is_cuda:
        torch.cuda.synchronize()
    peak = 5 * 2 * 2048 ** 3 / (time.perf_counter() - start)
    print(f"torchvision runs {flops / 1e9:.0f} GFLOP per slice ({flops / seconds / 1e9:.0f} GFLOP/s); this machine's "
          f"float32 matmul runs {peak / 1e9:.0f} GFLOP/s, so direct convolution cannot beat {flops / peak:.2f} s/slice "
          f"({seconds * peak / flops:.2f}x torchvision); beyond that only Winograd's fewer multiplications help")
    return {"gflop_per_slice": flops / 1e9, "matmul_gflops": peak / 1e9}


def light_models(num_classes: int, device: torch.device, image: torch.Tensor, detections: int) -> dict:
    """Fast copies of the lightweight models, each checked against its model."""
    models = {}
    for name, truncation in LIGHT_CONFIGS:
        model = maskrcnn_resnet_fpn(backbone_name=name, truncation=truncation, num_classes=num_classes,
                                    box_detections_per_img=detections).eval().to(device)
        fast = fast_inference_copy(model)
        with torch.inference_mode():
            report_agreement(f"{name} t{truncation} fast copy vs model", compare(model([image])[0], fast([image])[0]))
        models[f"ours, {name} truncation {truncation} (fast)"] = fast
    return models


if __name__ == "__main__":
    main(get_args_parser().parse_args())
