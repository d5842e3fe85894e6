"""Matching predictions to ground truth by IoU, and balanced sampling of positives and negatives."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

BELOW_LOW = -1
BETWEEN = -2


class Matcher:
    """Assign each predicted box the index of its best ground-truth box, or a negative code.

    Args:
        high: IoU at or above which a match is positive.
        low: IoU below which a box is background (``BELOW_LOW``); in between it is ignored
            (``BETWEEN``).
        allow_low_quality: also match, for every ground-truth box, the predictions that overlap it
            most, even below ``high`` (the RPN uses this so every object gets an anchor).
    """

    def __init__(self, high: float, low: float, *, allow_low_quality: bool) -> None:
        if low > high:
            raise ValueError(f"low IoU threshold {low} must not exceed the high one {high}")
        self.high, self.low, self.allow_low_quality = high, low, allow_low_quality

    def __call__(self, gt_boxes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Match ``boxes`` (FloatTensor[N, 4]) to ``gt_boxes`` (FloatTensor[M, 4], M > 0).

        Returns:
            Int64Tensor[N]: the matched ground-truth index, or ``BELOW_LOW`` / ``BETWEEN``.
        """
        quality = box_iou(gt_boxes, boxes)  # (M, N)
        best, matches = quality.max(dim=0)
        original = matches.clone()
        matches[best < self.low] = BELOW_LOW
        matches[(best >= self.low) & (best < self.high)] = BETWEEN
        if self.allow_low_quality:
            best_per_gt = quality.max(dim=1).values
            _, pred_idx = torch.where(quality == best_per_gt[:, None])
            matches[pred_idx] = original[pred_idx]
        return matches


def sample_balanced(labels: torch.Tensor, *, batch_size: int,
                    positive_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly choose at most ``batch_size`` indices with at most ``positive_fraction`` positives.

    Args:
        labels: Int/FloatTensor[N]: >= 1 positive, 0 negative, -1 ignored.
        batch_size: indices to draw per image.
        positive_fraction: upper share of positives; negatives fill the rest.

    Returns:
        Int64Tensors of the chosen positive and negative indices.
    """
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    return pos, neg
