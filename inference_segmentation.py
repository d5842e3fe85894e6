"""Lesion segmentation of CT slices with a trained COVID-CT-Mask-Net segmentation model.

Canonical command::

    python inference_segmentation.py --ckpt runs/segmentation/checkpoint_best.pth \
        --test_data_dir data/phantom/seg/test --test_imgs_dir imgs --save_dir runs/inference

Writes one overlay PNG per slice (lesion masks coloured by class, boxes with scores, a legend) and
``predictions.json`` in COCO results format (RLE masks; each entry also names its ``file_name``).
Model settings (backbone, truncation, mask type, thresholds) come from the checkpoint unless a flag
gives them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from datasets.conventions import class_names_for
from datasets.io import read_image
from utils.cli import add_device_args, probability, resolve_device, run_cli
from utils.model_io import load_model_for_inference
from utils.plots import detection_overlay
from utils.rle import encode_masks

IMAGE_GLOBS = ("*.png", "*.jpg", "*.jpeg")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="segmentation checkpoint (required)")
    p.add_argument("--test_data_dir", default="data/phantom/seg/test", help="data root (default: data/phantom/seg/test)")
    p.add_argument("--test_imgs_dir", default="imgs", help="image folder inside the data root (default: imgs)")
    p.add_argument("--save_dir", default="runs/inference", help="output folder (default: runs/inference)")
    add_model_args(p)
    p.add_argument("--mask_logits_th", type=probability, default=0.5,
                   help="mask probability above which a pixel is lesion (default: 0.5)")
    p.add_argument("--no_overlays", action="store_true", help="write predictions.json only (default: overlays too)")
    add_device_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model flags: those whose default is the checkpoint's own setting, and --unfused."""
    p.add_argument("--backbone_name", default=None, help="checked against the checkpoint (default: from checkpoint)")
    p.add_argument("--truncation", type=int, default=None, choices=[0, 1, 2], help="checked against the checkpoint (default: from checkpoint)")
    p.add_argument("--mask_type", default=None, choices=["both", "ggo", "merge"], help="checked against the checkpoint (default: from checkpoint)")
    p.add_argument("--rpn_nms_th", type=probability, default=None, help="RPN NMS IoU threshold (default: from checkpoint)")
    p.add_argument("--roi_nms_th", type=probability, default=None, help="per-class NMS IoU threshold on detections (default: from checkpoint)")
    p.add_argument("--confidence_th", type=probability, default=None, help="lowest detection score kept (default: from checkpoint)")
    p.add_argument("--unfused", action="store_true",
                   help="run the model as trained instead of its fused inference copy (BatchNorm folded, faster "
                        "CPU kernels; same detections up to float rounding, about 1e-5) (default: fused)")


def load_segmentation_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's Mask R-CNN in eval mode on ``device`` (its fused copy unless --unfused), and the checkpoint."""
    model, ckpt = load_model_for_inference(args.ckpt, device=device, flags=vars(args))
    return (model if args.unfused else model.fuse_for_inference()), ckpt


def list_images(folder: Path) -> list[Path]:
    """Slice images in ``folder``, sorted by name.

    Raises:
        FileNotFoundError / ValueError: for a missing or empty folder, naming it.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(f for g in IMAGE_GLOBS for f in folder.glob(g))
    if not files:
        raise ValueError(f"{folder}: no PNG/JPG images found")
    return files


def image_tensor(path: Path) -> torch.Tensor:
    """FloatTensor[3, H, W] in [0, 1] from a grayscale or colour slice."""
    gray = torch.from_numpy(read_image(path)).float().div_(255)
    return gray.expand(3, -1, -1).contiguous()


def coco_results(detections: dict, *, image_id: int, file_name: str, mask_threshold: float) -> list[dict]:
    """COCO results entries (bbox xywh, RLE segmentation, score, category) for one image."""
    boxes = detections["boxes"].tolist()
    binary = (detections["masks"][:, 0] > mask_threshold).to(torch.uint8)
    rles = encode_masks(binary.cpu())
    return [{"image_id": image_id, "file_name": file_name, "category_id": int(label), "score": float(score),
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "segmentation": rle}
            for b, score, label, rle in zip(boxes, detections["scores"].tolist(), detections["labels"].tolist(), rles)]


@torch.inference_mode()
def run_inference(model, files: list[Path], *, device: torch.device, save_dir: Path, class_names: tuple[str, ...],
                  mask_threshold: float, overlays: bool = True) -> list[dict]:
    """Predict every slice, write overlays, return COCO results entries."""
    results = []
    for image_id, path in enumerate(tqdm(files, desc="slices")):
        image = image_tensor(path)
        det = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        results += coco_results(det, image_id=image_id, file_name=path.name, mask_threshold=mask_threshold)
        if overlays:
            detection_overlay(image, det, save_dir / f"{path.stem}_overlay.png", class_names=class_names,
                              mask_threshold=mask_threshold, title=f"{path.name}: {len(det['scores'])} lesions")
    return results


def main(args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    files = list_images(Path(args.test_data_dir) / args.test_imgs_dir)
    model, ckpt = load_segmentation_model(args, device)
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    class_names = tuple(ckpt.get("class_names") or class_names_for(ckpt.get("mask_type", "both")))
    results = run_inference(model, files, device=device, save_dir=save_dir, class_names=class_names,
                            mask_threshold=args.mask_logits_th, overlays=not args.no_overlays)
    out = save_dir / "predictions.json"
    out.write_text(json.dumps(results))
    print(f"{len(files)} slices, {len(results)} detections -> {out}" + ("" if args.no_overlays else f" and overlays in {save_dir}"))
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
