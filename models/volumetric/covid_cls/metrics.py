"""Binary classification metrics of the COVID-19 classifier: accuracy, sensitivity, specificity, ROC AUC, log loss."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from utils.classification_metrics import confusion_matrix, per_class_rates, roc_auc


def classification_metrics(labels: Sequence[int], probabilities: Sequence[float], *,
                           threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, sensitivity, specificity at ``threshold``, ROC AUC and log loss of binary predictions.

    Args:
        labels: ground truth per case, 1 COVID-19, 0 otherwise.
        probabilities: predicted COVID-19 probability per case.
        threshold: probability at or above which a case is called positive.

    Returns:
        ``accuracy``, ``sensitivity`` (true-positive rate), ``specificity`` (true-negative rate),
        ``auc`` (NaN when only one class is present; so are the rates without cases of their
        class), ``log_loss`` (the mean binary cross-entropy in nats, probabilities clipped to
        [1e-7, 1 - 1e-7]: low only when the probabilities are right, not just well ranked), and the
        counts ``tp``, ``fp``, ``tn``, ``fn``, ``n``.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"need one probability per label and at least one case, got {y.size} and {p.size}")
    matrix = confusion_matrix(y, (p >= threshold).astype(np.int64), num_classes=2)  # rows true, cols predicted
    rates = per_class_rates(matrix)
    (tn, fp), (fn, tp) = matrix.tolist()
    return {"accuracy": float(np.trace(matrix) / y.size), "sensitivity": float(rates["sensitivity"][1]),
            "specificity": float(rates["specificity"][1]), "auc": _auc(y, p), "log_loss": _log_loss(y, p),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": int(y.size)}


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(p, 1e-7, 1.0 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    if len(set(y.tolist())) < 2:
        warnings.warn("ROC AUC is undefined with one class present; reported as NaN", stacklevel=3)
        return float("nan")
    return roc_auc(y, p)
