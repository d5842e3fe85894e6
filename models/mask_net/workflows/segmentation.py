"""The lesion segmentation model (Mask R-CNN) on CNCB-layout slices: training and inference.

:func:`train_segmentation` trains from a :class:`SegmentationTrainConfig`; its run directory receives
args.json, env.txt, metrics.jsonl, checkpoint_last.pth, checkpoint_best.pth (highest validation mask
mAP so far, kept across a resume) and every ``save_every`` epochs ``<model_name>_ckpt_<epoch>.pth``.
:func:`infer_segmentation` runs a trained checkpoint over a folder of slices and writes overlays and
COCO results. Each config's fields are the flags of the script of the same name.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.augmentation import SliceAugmentation
from datasets.conventions import class_names_for, num_detection_classes
from datasets.io import read_image
from datasets.segmentation import CNCBSegmentationDataset
from models.mask_net.covid_mask_net import SEGMENTATION_BUILDER
from models.mask_net.fast import fast_inference_copy
from models.mask_net.mask_rcnn import maskrcnn_resnet_fpn
from models.mask_net.workflows.model_io import builder_keywords, load_model_for_inference
from utils.amp import for_inference, grad_scaler
from utils.checkpoint import load_checkpoint
from utils.cli import resolve_device
from utils.distributed import DistContext, means_over_ranks, train_shuffling
from utils.plots import detection_overlay
from utils.reproducibility import worker_init_fn
from utils.rle import encode_masks
from utils.run_dir import Best, RunDir
from utils.training import (
    RunConfig,
    current_lr,
    fit,
    load_weights,
    start_training,
)

from .loops import prepare_training, train_one_epoch, validation_detection_metrics, validation_loss

IMAGE_GLOBS = ("*.png", "*.jpg", "*.jpeg")
# Model settings that a segmentation checkpoint's builder kwargs take from the training config.
TRAINED_SETTINGS = ("backbone_name", "truncation", "rpn_nms_th", "image_size")
# Settings that the training preset sets (flag -> builder keyword of maskrcnn_resnet_fpn); None keeps the preset's.
SAMPLING_SETTINGS = {"rpn_fg_iou_th": "rpn_fg_iou_thresh", "rpn_bg_iou_th": "rpn_bg_iou_thresh",
                     "roi_fg_iou_th": "box_fg_iou_thresh", "roi_bg_iou_th": "box_bg_iou_thresh",
                     "roi_samples": "box_batch_size_per_image", "anchor_sizes": "anchor_sizes",
                     "fpn_channels": "fpn_channels", "mask_overlap_th": "mask_overlap_thresh"}
# Training presets: builder keywords of the anchor and RoI matching and sampling and of the FPN's width,
# before the flags (a flag given wins). "paper" keeps COVID-CT-Mask-Net's values (the builder's covid
# preset: RoI foreground IoU 0.75, background below 0.5, 256 RoIs per image, RPN 0.7 / 0.3, anchors
# 2-32 px, 256 FPN channels). "lesion", the default, takes a proposal with IoU >= 0.5 as foreground
# (with 0.75 about 1 % of the sampled RoIs were positive, nearly all of them the ground-truth boxes,
# and the box head never learnt to score real proposals), samples 128 RoIs per image and narrows the
# FPN to 128 channels: on the phantom it reaches the same test mask AP in about 2/3 of the time
# (README, "Why the detector learned slowly"). It also drops a detection whose mask lies more than half
# inside a better one's (``models.mask_net.mask_overlap``): box NMS keeps parts of a lesion nested in
# its whole, and these stacked detections cost precision (README, "Stacked detections"). Its anchors
# are 4-64 px: a 2-px anchor matched no lesion better than a 4-px one, and the boxes of 32 px and more
# (29 % of them at 256 px, a third of the consolidations) need the 64-px one (README, anchor table).
PRESETS = {"lesion": {"box_fg_iou_thresh": 0.5, "box_bg_iou_thresh": 0.5, "box_batch_size_per_image": 128,
                      "fpn_channels": 128, "mask_overlap_thresh": 0.5, "anchor_sizes": (4, 8, 16, 32, 64)},
           "paper": {}}
# The metric (in metrics.jsonl) that chooses checkpoint_best.pth; higher is better.
SELECTION_METRIC = "val_segm_mAP"


@dataclass(kw_only=True)
class SegmentationTrainConfig(RunConfig):
    """Settings of :func:`train_segmentation`; the run settings are those of :class:`utils.training.RunConfig`.

    Attributes:
        train_data_dir, val_data_dir: CNCB data roots; ``imgs_dir`` and ``gt_dir`` are folders in each.
        mask_type: both (GGO and consolidation as 2 classes), ggo or merge (one lesion class).
        augment: augment the training slices (horizontal flip, zoom 0.9-1.1, brightness and contrast
            +-0.1; ``datasets.augmentation.SliceAugmentation``).
        backbone_name, truncation, rpn_nms_th, image_size: the model (see ``workflows.cli.MODEL_FLAGS``).
        preset: the anchor and RoI matching of training (:data:`PRESETS`): "lesion" or "paper".
        rpn_fg_iou_th, rpn_bg_iou_th, roi_fg_iou_th, roi_bg_iou_th, roi_samples, anchor_sizes: the
            anchor and RoI matching and sampling; fpn_channels: the FPN's width; mask_overlap_th: the
            mask-overlap suppression of the detections (see :data:`SAMPLING_SETTINGS`); None keeps the
            preset's value.
        pretrained_model: segmentation checkpoint whose weights initialise training, or None.
        use_pretrained_resnet_backbone: local torchvision ResNet state dict for the backbone, or None.
    """

    train_data_dir: str = "data/phantom/seg/train"
    val_data_dir: str = "data/phantom/seg/val"
    imgs_dir: str = "imgs"
    gt_dir: str = "masks"
    mask_type: str = "both"
    augment: bool = False
    backbone_name: str = "resnet18"
    truncation: int = 1
    rpn_nms_th: float = 0.75
    image_size: int = 512
    preset: str = "lesion"
    rpn_fg_iou_th: float | None = None
    rpn_bg_iou_th: float | None = None
    roi_fg_iou_th: float | None = None
    roi_bg_iou_th: float | None = None
    roi_samples: int | None = None
    anchor_sizes: tuple[int, ...] | None = None
    fpn_channels: int | None = None
    mask_overlap_th: float | None = None
    pretrained_model: str | None = None
    use_pretrained_resnet_backbone: str | None = None
    save_dir: str = "runs/segmentation"
    model_name: str = "mrcnn_covid_segmentation_model"
    batch_size: int = 1


def segmentation_builder_kwargs(config: SegmentationTrainConfig) -> dict:
    """Keyword arguments of :func:`maskrcnn_resnet_fpn` that the checkpoints store.

    Raises:
        ValueError: for an unknown preset.
    """
    if config.preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {config.preset!r}")
    sampling = {**PRESETS[config.preset],
                **{keyword: getattr(config, name) for name, keyword in SAMPLING_SETTINGS.items()
                   if getattr(config, name) is not None}}
    if "anchor_sizes" in sampling:
        sampling["anchor_sizes"] = [int(size) for size in sampling["anchor_sizes"]]
    return {**builder_keywords(asdict(config), names=TRAINED_SETTINGS), **sampling,
            "num_classes": num_detection_classes(config.mask_type)}


def segmentation_loaders(config: SegmentationTrainConfig, ctx: DistContext | None = None
                         ) -> tuple[DataLoader, DataLoader]:
    """Training (shuffled, seeded; this process's DistributedSampler share under DDP) and validation loaders
    over the CNCB layout."""
    def dataset(root, transforms=None):
        return CNCBSegmentationDataset(root, imgs_dir=config.imgs_dir, masks_dir=config.gt_dir,
                                       mask_type=config.mask_type, transforms=transforms)

    augment = SliceAugmentation() if config.augment else None
    train_set, val_set = dataset(config.train_data_dir, augment), dataset(config.val_data_dir)
    common = dict(batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=train_set.collate_fn,
                  worker_init_fn=worker_init_fn)
    generator = torch.Generator().manual_seed(config.seed)
    return (DataLoader(train_set, generator=generator, **train_shuffling(train_set, ctx, config.seed), **common),
            DataLoader(val_set, shuffle=False, **common))


def train_segmentation(config: SegmentationTrainConfig) -> RunDir | None:
    """Train the segmentation model, as one process or as one of several under ``torchrun`` (DDP).

    Under DDP each process trains on its share of every epoch and gradients are averaged; rank 0 alone
    validates and writes the run directory while the others wait at a barrier.

    Returns:
        The run directory (None on non-zero ranks).

    Raises:
        FileExistsError: for a new run in a used ``save_dir`` without ``overwrite``.
        ValueError: for a checkpoint of another kind, or ``sync_bn`` on CPU processes.
    """
    with start_training(config) as ctx:
        return _train_segmentation(config, ctx)


def _train_segmentation(config: SegmentationTrainConfig, ctx: DistContext) -> RunDir | None:
    kwargs = segmentation_builder_kwargs(config)
    train_loader, val_loader = segmentation_loaders(config, ctx)
    model = maskrcnn_resnet_fpn(**kwargs, pretrained_backbone=config.use_pretrained_resnet_backbone)
    if config.pretrained_model:
        ckpt = load_checkpoint(config.pretrained_model, builder=SEGMENTATION_BUILDER, kind="segmentation")
        load_weights(model, ckpt["model"], config.pretrained_model)  # names the file and the flags on a mismatch
    net, optimizer, set_lr_for = prepare_training(model, config, ctx, train_loader)
    device = ctx.device
    steps = dict(max_steps=config.max_steps, progress=not config.no_progress and ctx.is_main)
    scaler = grad_scaler(device, config.amp)

    def run_epoch(epoch: int) -> dict:
        train = train_one_epoch(net, train_loader, optimizer, device=device, epoch=epoch,
                                set_lr=set_lr_for(epoch), amp=config.amp, scaler=scaler, **steps)
        train = means_over_ranks(train, ctx)
        if not ctx.is_main:
            return {}
        val = {**validation_loss(model, val_loader, device=device, epoch=epoch, **steps),
               **validation_detection_metrics(model, val_loader, device=device, epoch=epoch, **steps)}
        print(f"Epoch {epoch}: train loss = {train['loss']:.3f}, validation loss = {val['loss']:.3f}, "
              f"validation mask mAP = {val['segm_mAP']:.4f}")
        return {**{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
                "lr": current_lr(optimizer)}

    def checkpoint_extras(record: dict) -> dict:
        return {"mask_type": config.mask_type, "class_names": list(class_names_for(config.mask_type)),
                "val_loss": record["val_loss"], SELECTION_METRIC: record[SELECTION_METRIC]}

    return fit(config, ctx=ctx, model=model, optimizer=optimizer, train_loader=train_loader,
               builder=SEGMENTATION_BUILDER, builder_kwargs=kwargs, kind="segmentation", run_epoch=run_epoch,
               checkpoint_extras=checkpoint_extras, best=Best(SELECTION_METRIC, higher_is_better=True), scaler=scaler)


@dataclass(kw_only=True)
class SegmentationModelConfig:
    """A trained segmentation model and how it runs; a setting left None comes from the checkpoint.

    Attributes:
        ckpt: the segmentation checkpoint.
        backbone_name, truncation, mask_type: checked against the checkpoint when given.
        rpn_nms_th, roi_nms_th, confidence_th, mask_overlap_th: replace the checkpoint's thresholds when given.
        mask_logits_th: mask probability above which a pixel is lesion.
        unfused: run the model as trained instead of its fast inference copy.
        amp: run it under autocast (:func:`utils.amp.for_inference`), as trained: the fast copy is float32.
        device: cpu, cuda or cuda:N.
    """

    ckpt: str
    backbone_name: str | None = None
    truncation: int | None = None
    mask_type: str | None = None
    rpn_nms_th: float | None = None
    roi_nms_th: float | None = None
    confidence_th: float | None = None
    mask_overlap_th: float | None = None
    mask_logits_th: float = 0.5
    unfused: bool = False
    amp: bool = False
    device: str = "cpu"


def load_segmentation_model(config: SegmentationModelConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's Mask R-CNN in eval mode on ``device`` (its fast copy unless ``unfused`` or ``amp``), and
    the checkpoint.

    Raises:
        ValueError: for a checkpoint of another kind, or a setting that contradicts it.
    """
    model, ckpt = load_model_for_inference(config.ckpt, device=device, flags=asdict(config))
    if not (config.unfused or config.amp):
        model = fast_inference_copy(model)
    return for_inference(model, device, config.amp), ckpt


@dataclass(kw_only=True)
class SegmentationInferenceConfig(SegmentationModelConfig):
    """Settings of :func:`infer_segmentation`: the model's, the slices (``test_data_dir/test_imgs_dir``),
    the output folder and whether to draw overlays."""

    test_data_dir: str = "data/phantom/seg/test"
    test_imgs_dir: str = "imgs"
    save_dir: str = "runs/inference"
    no_overlays: bool = False


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


def infer_segmentation(config: SegmentationInferenceConfig) -> Path:
    """Segment every slice of ``test_data_dir/test_imgs_dir``; returns the path of ``predictions.json``.

    Writes one overlay PNG per slice (unless ``no_overlays``) and ``predictions.json`` in COCO results
    format (RLE masks; each entry also names its ``file_name``) into ``save_dir``.

    Raises:
        FileNotFoundError / ValueError: for a missing or empty image folder, a checkpoint of another
            kind, or a setting that contradicts it.
    """
    device = resolve_device(config.device)
    files = list_images(Path(config.test_data_dir) / config.test_imgs_dir)
    model, ckpt = load_segmentation_model(config, device)
    save_dir = Path(config.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    class_names = tuple(ckpt.get("class_names") or class_names_for(ckpt.get("mask_type", "both")))
    results = run_inference(model, files, device=device, save_dir=save_dir, class_names=class_names,
                            mask_threshold=config.mask_logits_th, overlays=not config.no_overlays)
    out = save_dir / "predictions.json"
    out.write_text(json.dumps(results))
    overlays = "" if config.no_overlays else f" and overlays in {save_dir}"
    print(f"{len(files)} slices, {len(results)} detections -> {out}{overlays}")
    return out
