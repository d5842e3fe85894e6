"""Dice overlap of label maps, with one stated convention for empty ground truth.

Empty-ground-truth convention (``EMPTY_GT_CONVENTION``): when a class is absent from the ground
truth, its Dice is 1.0 if the prediction is also empty and 0.0 otherwise; with
``ignore_empty=True`` such a case is excluded instead (NaN, skipped by the mean). This matches
MONAI's ``DiceMetric(ignore_empty=False)`` and ``DiceMetric(ignore_empty=True)`` respectively.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

EMPTY_GT_CONVENTION = ("a class absent from the ground truth scores 1.0 when the prediction is also "
                       "empty and 0.0 otherwise (excluded instead with --ignore_empty)")


def dice_per_class(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, *, num_classes: int,
                   ignore_empty: bool = False) -> list[float]:
    """Dice of each foreground class between two label maps of one case.

    Args:
        pred: Int[...] predicted labels in ``[0, num_classes)`` (any spatial shape).
        target: Int[...] ground-truth labels, same shape as ``pred``.
        num_classes: classes including background (label 0, not scored).
        ignore_empty: NaN instead of the 1.0/0.0 convention for classes absent from ``target``.

    Returns:
        ``num_classes - 1`` floats, class 1 first.

    Raises:
        ValueError: when the shapes differ.
    """
    pred, target = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(target))
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(target.shape)}")
    return [_dice(pred == c, target == c, ignore_empty) for c in range(1, num_classes)]


def mean_ignoring_nan(values: Iterable[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else float("nan")


def _dice(pred: torch.Tensor, target: torch.Tensor, ignore_empty: bool) -> float:
    truth = int(target.sum())
    if truth == 0:
        if ignore_empty:
            return float("nan")
        return 1.0 if int(pred.sum()) == 0 else 0.0
    overlap = int((pred & target).sum())
    return 2.0 * overlap / (int(pred.sum()) + truth)
