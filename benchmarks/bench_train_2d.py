"""Time of a 2D segmentation training step: torchvision's RoIAlign against the trainers' gather poolers.

    python -m benchmarks.bench_train_2d            (from the repository root)

Two copies of one Mask R-CNN (same weights) take the same optimizer-free training steps (forward,
losses, backward) on the same batches of phantom-like slices with lesion targets: one pools RoIs with
torchvision's ``MultiScaleRoIAlign``, the other with ``models.mask_net.fast.poolers.use_gather_poolers``
(what ``train_segmentation.py`` and ``train_classifier.py`` use on CPU). The losses are checked equal
first; the times are medians of interleaved repeats, and the ratio is what the README reports. Run
with ``--fpn_channels 256 --roi_samples 256`` for the original's sizes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.fast.poolers import use_gather_poolers


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=256, help="side of the square slices (default: 256)")
    p.add_argument("--truncation", type=int, default=2, help="ResNet18 truncation (default: 2)")
    p.add_argument("--fpn_channels", type=int, default=128, help="FPN width (default: 128, the lesion preset's)")
    p.add_argument("--roi_samples", type=int, default=128,
                   help="RoIs sampled per image (default: 128, the lesion preset's)")
    p.add_argument("--batch_size", type=int, default=2, help="slices per step (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model, after one warm-up (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and slices (default: 0)")
    return p


def batch(size: int, count: int, generator: torch.Generator) -> tuple[list, list]:
    """``count`` noise slices, each with three elliptic lesions of 6-40 px (two GGO, one consolidation)."""
    images, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(count):
        image = torch.rand(3, size, size, generator=generator) * 0.2
        masks, boxes = [], []
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=generator) * (size - 60) + 30).tolist()
            ry, rx = (torch.rand(2, generator=generator) * 17 + 3).tolist()
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            image[:, mask] += 0.5
            masks.append(mask.to(torch.uint8))
            ys, xs = torch.nonzero(mask, as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(image.clamp(0, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, 1, 2]),
                        "masks": torch.stack(masks)})
    return images, targets


def step(model: torch.nn.Module, images: list, targets: list) -> float:
    """Forward and backward of one training step; returns the summed loss."""
    model.zero_grad(set_to_none=True)
    total = sum(model(images, targets).values())
    total.backward()
    return float(total.detach())


def main(args: argparse.Namespace) -> dict[str, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = dict(backbone_name="resnet18", truncation=args.truncation, num_classes=3, min_size=args.image_size,
                  max_size=2 * args.image_size, fpn_channels=args.fpn_channels, box_fg_iou_thresh=0.5,
                  box_bg_iou_thresh=0.5, box_batch_size_per_image=args.roi_samples)
    reference = maskrcnn_resnet_fpn(**kwargs).train()
    gather = maskrcnn_resnet_fpn(**kwargs).train()
    gather.load_state_dict(reference.state_dict())
    use_gather_poolers(gather.roi_heads)
    models = {"torchvision roi_align": reference, "gather poolers": gather}
    generator = torch.Generator().manual_seed(args.seed)
    batches = [batch(args.image_size, args.batch_size, generator) for _ in range(args.repeats + 1)]
    losses = {}
    for name, model in models.items():  # warm-up, and the same losses from both (sampling seeded alike)
        torch.manual_seed(args.seed)
        losses[name] = step(model, *batches[0])
    print(f"first-step loss: {losses}")
    assert abs(losses["torchvision roi_align"] - losses["gather poolers"]) < 1e-3 * abs(losses["gather poolers"])
    times = {name: [] for name in models}
    for images, targets in batches[1:]:
        for name, model in models.items():
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            step(model, images, targets)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"training step, {args.batch_size} slices of {args.image_size} px, ResNet18-t{args.truncation}, "
          f"FPN {args.fpn_channels}, {args.roi_samples} RoIs/image, {torch.get_num_threads()} threads:")
    for name, seconds in medians.items():
        print(f"  {name:22s} {seconds:.3f} s")
    print(f"  ratio {medians['torchvision roi_align'] / medians['gather poolers']:.2f}x")
    return medians


if __name__ == "__main__":
    main(get_args_parser().parse_args())
