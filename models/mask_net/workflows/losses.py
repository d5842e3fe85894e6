"""Losses of COVID-CT-Mask-Net's classification module S (the detector's losses live in its heads)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, kind: str = "bce",
                        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of S's logits.

    Args:
        logits: Float[N, 3].
        labels: Int64[N] in {0, 1, 2}.
        kind: ``bce`` (binary cross-entropy with logits on one-hot labels) or ``ce`` (cross-entropy).
        class_weights: Float[3] weight of each true class, or None.

    Returns:
        Scalar loss averaged over the slices (weighted mean when ``class_weights`` is given).
    """
    weights = torch.ones_like(labels, dtype=logits.dtype) if class_weights is None else class_weights.to(logits)[labels]
    if kind == "ce":
        per_slice = F.cross_entropy(logits, labels, reduction="none")
    elif kind == "bce":
        one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        per_slice = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").mean(dim=1)
    else:
        raise ValueError(f"loss must be 'bce' or 'ce', got {kind!r}")
    return (per_slice * weights).sum() / weights.sum()


def inverse_frequency_weights(labels: list[int], num_classes: int = 3) -> torch.Tensor:
    """Float[K] class weights n / (K * count_k), so that a balanced set gets all ones; 0 for absent classes."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(counts.sum(), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.as_tensor(weights, dtype=torch.float32)
