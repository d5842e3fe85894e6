"""Losses of the RoI heads: Fast R-CNN classification + box regression, and the mask loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def fastrcnn_loss(class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
                  regression_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over all sampled RoIs; smooth L1 (beta 1/9) of positives' own-class deltas.

    Args:
        class_logits: FloatTensor[R, K].
        box_deltas: FloatTensor[R, 4K].
        labels: Int64Tensor[R], 0 for background.
        regression_targets: FloatTensor[R, 4].

    Returns:
        (classification loss, box loss); the box loss is a sum over positives divided by R, so it
        is exactly zero when no RoI is positive.
    """
    classification = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)  # (R, K, 4)
    box_loss = F.smooth_l1_loss(deltas[positive, labels[positive]], regression_targets[positive], beta=1 / 9,
                                reduction="sum")
    return classification, box_loss / labels.numel()


def mask_targets(gt_masks: torch.Tensor, rois: torch.Tensor, matched_idxs: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each RoI's matched ground-truth mask and resize it to ``size`` x ``size``.

    Args:
        gt_masks: UInt8Tensor[M, H, W] of one image.
        rois: FloatTensor[P, 4] positive RoIs (xyxy).
        matched_idxs: Int64Tensor[P], index of each RoI's ground-truth mask.

    Returns:
        FloatTensor[P, size, size] in [0, 1].
    """
    if rois.shape[0] == 0:
        return rois.new_zeros((0, size, size))
    boxes = torch.cat([matched_idxs[:, None].to(rois), rois], dim=1)  # (P, 5): mask index, box
    return roi_align(gt_masks[:, None].to(rois), boxes, (size, size), 1.0)[:, 0]


def mask_loss(mask_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each RoI's own-class logits; zero (with a gradient path) when no RoI.

    Args:
        mask_logits: FloatTensor[P, K, S, S].
        labels: Int64Tensor[P].
        targets: FloatTensor[P, S, S].
    """
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    own = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(own, targets)
