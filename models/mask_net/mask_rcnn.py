"""The Mask R-CNN wrapper and its keyword-only builder.

``MaskRCNN.forward`` reads like the paper: transform -> backbone (+FPN) -> RPN -> RoI heads (box
head, mask head) -> postprocess. Variants (backbone depth, truncation, head sizes, presets) change a
stage, never the wiring. Parameter names follow torchvision's (``backbone.body.*``,
``backbone.fpn.*``, ``rpn.head.*``, ``roi_heads.box_head.*``, ``roi_heads.box_predictor.*``,
``roi_heads.mask_head.*``, ``roi_heads.mask_predictor.*``) for every preset. The RoI poolers are
torchvision's ``MultiScaleRoIAlign``; a faster inference-only copy is :func:`models.mask_net.fast.fast_inference_copy`.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from .anchors import AnchorGenerator
from .backbone import RESNETS, load_resnet_weights, resnet_fpn_backbone
from .box_head import FastRCNNPredictor, TwoMLPHead
from .mask_head import MaskHead, MaskPredictor
from .mask_overlap import suppress_overlapping_masks
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, ImageBatch

# COVID-CT-Mask-Net's hyperparameters (its training script and torchvision 0.3 defaults).
COVID_DEFAULTS = dict(
    min_size=512, max_size=1024, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, fpn_channels=256,
    extra_pool_level=False, norm="batchnorm",
    anchor_sizes=(2, 4, 8, 16, 32), aspect_ratios=(0.1, 0.25, 0.5, 1.0, 1.5, 2.0),
    rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3, rpn_batch_size_per_image=256, rpn_positive_fraction=0.75,
    rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_train=2000,
    rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.75, rpn_score_thresh=0.0,
    box_roi_size=7, mask_roi_size=14, sampling_ratio=2, representation_size=128,
    box_fg_iou_thresh=0.75, box_bg_iou_thresh=0.5, box_batch_size_per_image=256, box_positive_fraction=0.75,
    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
    mask_overlap_thresh=1.0, mask_layers=None, with_masks=True,
)
# torchvision's maskrcnn_resnet50_fpn.
TORCHVISION_DEFAULTS = dict(
    COVID_DEFAULTS, min_size=800, max_size=1333, extra_pool_level=True,
    anchor_sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=(0.5, 1.0, 2.0),
    rpn_positive_fraction=0.5, rpn_nms_thresh=0.7, representation_size=1024,
    box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512, box_positive_fraction=0.25,
    mask_layers=(256, 256, 256, 256),
)
PRESETS = {"covid": COVID_DEFAULTS, "torchvision": TORCHVISION_DEFAULTS}
LIGHT_MASK_LAYERS, FULL_MASK_LAYERS = (128,), (256, 256, 256, 256)


class MaskRCNN(nn.Module):
    """Transform -> backbone -> RPN -> RoI heads -> postprocess.

    Training: ``model(images, targets)`` returns the losses ``loss_objectness``, ``loss_rpn_box_reg``,
    ``loss_classifier``, ``loss_box_reg`` and ``loss_mask``. Eval: ``model(images)`` returns per image
    ``boxes`` FloatTensor[N, 4] (xyxy, original pixels), ``scores`` FloatTensor[N], ``labels``
    Int64Tensor[N] and ``masks`` FloatTensor[N, 1, H, W] (probabilities in [0, 1]), after
    mask-overlap suppression when the RoI heads' ``mask_overlap_thresh`` is below 1.

    Args:
        transform, backbone, rpn, roi_heads: the stages.
    """

    def __init__(self, transform: DetectionTransform, backbone: nn.Module, rpn: RegionProposalNetwork,
                 roi_heads: RoIHeads) -> None:
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = transform, backbone, rpn, roi_heads

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Args: images: list of FloatTensor[3, H, W] in [0, 1]; targets: list of dicts with ``boxes``
        FloatTensor[N, 4] xyxy, ``labels`` Int64Tensor[N] and ``masks`` UInt8Tensor[N, H, W] (training only).
        """
        if self.training:
            check_targets(targets, len(images), need_masks=self.roi_heads.has_mask)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self._postprocess(detections, batch, original_sizes)

    def _postprocess(self, detections: list[dict], batch: ImageBatch,
                     original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Mask-overlap suppression and pasting onto the original images, in float32 whatever precision the
        stages ran in (under autocast the heads give bfloat16 or float16 masks and deltas)."""
        detections = [{k: v.float() if v.is_floating_point() else v for k, v in d.items()} for d in detections]
        with torch.autocast(device_type=batch.tensors.device.type, enabled=False):
            if self.roi_heads.has_mask and self.roi_heads.mask_overlap_thresh < 1:
                thresh = self.roi_heads.mask_overlap_thresh
                detections = [suppress_overlapping_masks(d, size, thresh=thresh)
                              for d, size in zip(detections, batch.image_sizes)]
            return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


def check_targets(targets: list[dict] | None, num_images: int, *, need_masks: bool) -> None:
    """Raise a ValueError naming the image and the field when ``targets`` are unusable for training."""
    if targets is None or len(targets) != num_images:
        raise ValueError(f"training needs one target dict per image ({num_images}), got "
                         f"{None if targets is None else len(targets)}")
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if boxes is None or boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"target {i}: boxes must be a FloatTensor[N, 4], got "
                             f"{None if boxes is None else (tuple(boxes.shape), boxes.dtype)}")
        if (boxes[:, 2:] <= boxes[:, :2]).any():
            raise ValueError(f"target {i}: boxes need x1 > x0 and y1 > y0 (xyxy), got {boxes.tolist()}")
        labels = t.get("labels")
        if labels is None or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: labels must be an Int64Tensor[{boxes.shape[0]}], got "
                             f"{None if labels is None else (tuple(labels.shape), labels.dtype)}")
        if need_masks and ("masks" not in t or t["masks"].shape[0] != boxes.shape[0]):
            raise ValueError(f"target {i}: masks must be a tensor [{boxes.shape[0]}, H, W]")


def _per_level(values, num_levels: int, name: str) -> tuple[tuple, ...]:
    """A flat tuple is used on every level; a tuple of tuples must give one entry per level."""
    values = tuple(values)
    if values and isinstance(values[0], (tuple, list)):
        if len(values) != num_levels:
            raise ValueError(f"{name} gives {len(values)} levels but the FPN has {num_levels}")
        return tuple(tuple(v) for v in values)
    return (values,) * num_levels


def _validate(backbone_name: str, truncation: int, num_classes: int, preset: str, overrides: dict) -> dict:
    if backbone_name not in RESNETS:
        raise ValueError(f"backbone_name must be one of {sorted(RESNETS)}, got {backbone_name!r}")
    if truncation not in (0, 1, 2) or isinstance(truncation, bool):
        raise ValueError(f"truncation must be 0, 1 or 2, got {truncation!r}")
    if backbone_name == "resnet50" and truncation != 0:
        raise ValueError(f"resnet50 is used whole: truncation must be 0, got {truncation}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be an int >= 2, got {num_classes!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if preset == "torchvision" and backbone_name != "resnet50":
        raise ValueError(f"preset 'torchvision' rebuilds maskrcnn_resnet50_fpn: backbone_name must be 'resnet50', "
                         f"got {backbone_name!r}")
    unknown = sorted(set(overrides) - set(PRESETS[preset]))
    if unknown:
        raise ValueError(f"unknown builder options {unknown}; valid ones are {sorted(PRESETS[preset])}")
    cfg = {**PRESETS[preset], **overrides}
    if not 0 < cfg["mask_overlap_thresh"] <= 1:
        raise ValueError(f"mask_overlap_thresh must be in (0, 1], got {cfg['mask_overlap_thresh']!r}")
    if cfg["norm"] not in ("batchnorm", "frozen"):
        raise ValueError(f"norm must be 'batchnorm' or 'frozen', got {cfg['norm']!r}")
    if cfg["mask_layers"] is None:
        cfg["mask_layers"] = FULL_MASK_LAYERS if backbone_name == "resnet50" else LIGHT_MASK_LAYERS
    return cfg


def _build_rpn(cfg: dict, channels: int, num_levels: int) -> RegionProposalNetwork:
    sizes = _per_level(cfg["anchor_sizes"], num_levels, "anchor_sizes")
    anchors = AnchorGenerator(sizes, _per_level(cfg["aspect_ratios"], num_levels, "aspect_ratios"))
    counts = set(anchors.num_anchors_per_location())
    if len(counts) != 1:
        raise ValueError(f"every FPN level needs the same number of anchors per position, got {sorted(counts)}")
    return RegionProposalNetwork(
        anchors, RPNHead(channels, counts.pop()), fg_iou_thresh=cfg["rpn_fg_iou_thresh"],
        bg_iou_thresh=cfg["rpn_bg_iou_thresh"], batch_size_per_image=cfg["rpn_batch_size_per_image"],
        positive_fraction=cfg["rpn_positive_fraction"], nms_thresh=cfg["rpn_nms_thresh"],
        pre_nms_top_n={"training": cfg["rpn_pre_nms_top_n_train"], "testing": cfg["rpn_pre_nms_top_n_test"]},
        post_nms_top_n={"training": cfg["rpn_post_nms_top_n_train"], "testing": cfg["rpn_post_nms_top_n_test"]},
        score_thresh=cfg["rpn_score_thresh"])


def _build_roi_heads(cfg: dict, channels: int, level_names: list[str], num_classes: int) -> RoIHeads:
    def pool(size):
        return MultiScaleRoIAlign(featmap_names=level_names, output_size=size, sampling_ratio=cfg["sampling_ratio"])

    rep = cfg["representation_size"]
    mask_head = MaskHead(channels, tuple(cfg["mask_layers"])) if cfg["with_masks"] else None
    mask_predictor = (MaskPredictor(mask_head.out_channels, mask_head.out_channels, num_classes)
                      if cfg["with_masks"] else None)
    return RoIHeads(
        box_roi_pool=pool(cfg["box_roi_size"]), box_head=TwoMLPHead(channels * cfg["box_roi_size"] ** 2, rep),
        box_predictor=FastRCNNPredictor(rep, num_classes),
        mask_roi_pool=pool(cfg["mask_roi_size"]) if cfg["with_masks"] else None, mask_head=mask_head,
        mask_predictor=mask_predictor, fg_iou_thresh=cfg["box_fg_iou_thresh"], bg_iou_thresh=cfg["box_bg_iou_thresh"],
        batch_size_per_image=cfg["box_batch_size_per_image"], positive_fraction=cfg["box_positive_fraction"],
        bbox_reg_weights=tuple(cfg["bbox_reg_weights"]), score_thresh=cfg["box_score_thresh"],
        nms_thresh=cfg["box_nms_thresh"], detections_per_img=cfg["box_detections_per_img"],
        mask_overlap_thresh=cfg["mask_overlap_thresh"])


def maskrcnn_resnet_fpn(*, backbone_name: str, truncation: int, num_classes: int, preset: str = "covid",
                        pretrained_backbone: str | None = None, **overrides) -> MaskRCNN:
    """Build COVID-CT-Mask-Net's Mask R-CNN (or torchvision's, with ``preset="torchvision"``).

    Args:
        backbone_name: "resnet18", "resnet34" or "resnet50".
        truncation: 0 full ResNet, 1 without layer4, 2 without layer3 and layer4 (resnet50: 0 only).
        num_classes: classes including background (2 for mask_type merge/ggo, 3 for both).
        preset: "covid" (the original's hyperparameters) or "torchvision" (``maskrcnn_resnet50_fpn``).
        pretrained_backbone: path of a local torchvision ResNet state dict loaded into the body
            (``fc.*`` and truncated stages ignored), or None for random weights. Nothing is downloaded.
        **overrides: any key of ``COVID_DEFAULTS`` (e.g. ``rpn_nms_thresh``, ``box_score_thresh``,
            ``box_nms_thresh``, ``mask_overlap_thresh``, ``min_size``, ``anchor_sizes`` flat or per level,
            ``mask_layers``, ``norm`` "batchnorm"/"frozen", ``with_masks``).

    Returns:
        A :class:`MaskRCNN` in training mode.

    Raises:
        ValueError: for an unknown backbone, truncation, preset or option, or an unusable
            ``pretrained_backbone`` file.
        FileNotFoundError: when ``pretrained_backbone`` does not exist.
    """
    cfg = _validate(backbone_name, truncation, num_classes, preset, overrides)
    backbone = resnet_fpn_backbone(backbone_name=backbone_name, truncation=truncation, out_channels=cfg["fpn_channels"],
                                   extra_pool_level=cfg["extra_pool_level"], norm=cfg["norm"])
    if pretrained_backbone is not None:
        load_resnet_weights(backbone.body, pretrained_backbone)
    level_names = [str(i) for i in range(len(backbone.body.returned))]
    num_levels = len(level_names) + int(cfg["extra_pool_level"])
    transform = DetectionTransform(min_size=cfg["min_size"], max_size=cfg["max_size"], image_mean=cfg["image_mean"],
                                   image_std=cfg["image_std"])
    return MaskRCNN(transform, backbone, _build_rpn(cfg, backbone.out_channels, num_levels),
                    _build_roi_heads(cfg, backbone.out_channels, level_names, num_classes))
