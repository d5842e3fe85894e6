"""Slice/scan classification metrics: confusion matrix, per-class rates, ROC curves and AUC.

Conventions: rows of a confusion matrix are the true class, columns the predicted class. A rate
whose denominator is zero (e.g. the sensitivity of a class with no true case) is NaN, never 0, so
it cannot be mistaken for a measured value; :func:`to_jsonable` turns NaN into ``null``.
Probabilities come in as Float[N, K] (each row sums to 1); labels as Int[N] in ``[0, K)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], *, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs.

    Args:
        y_true: Int[N] true classes in ``[0, num_classes)``.
        y_pred: Int[N] predicted classes in ``[0, num_classes)``.
        num_classes: K.

    Returns:
        Int64[K, K]; rows true class, columns predicted class.

    Raises:
        ValueError: when the lengths differ or a class is out of range.
    """
    y_true, y_pred = _labels(y_true, num_classes, "y_true"), _labels(y_pred, num_classes, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} entries but y_pred has {y_pred.size}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)  # [K*K] -> [K, K]


def per_class_rates(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest sensitivity, specificity, PPV and F1 of every class.

    Args:
        matrix: Int[K, K] confusion matrix, rows true.

    Returns:
        ``sensitivity`` (recall), ``specificity``, ``ppv`` (precision), ``f1``: Float64[K] each,
        NaN where the denominator is zero.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    fn = matrix.sum(axis=1) - tp
    fp = matrix.sum(axis=0) - tp
    tn = matrix.sum() - tp - fn - fp
    return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the original's "class sensitivity" matrix); NaN rows when empty."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return _ratio(matrix, matrix.sum(axis=1, keepdims=True))


def roc_curve(y_true: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of a binary problem, one point per distinct score (ties form one step).

    Args:
        y_true: Int/Bool[N], 1 for the positive class.
        scores: Float[N], higher means more likely positive.

    Returns:
        ``fpr``, ``tpr`` (Float64[T+1], starting at (0, 0) and ending at (1, 1)) and the
        ``thresholds`` Float64[T+1] (the first is +inf): a case is called positive when its score
        is >= the threshold.

    Raises:
        ValueError: when the lengths differ, or when there is no positive or no negative case.
    """
    y, s = _binary_inputs(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # index where each distinct score ends
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve by the trapezoidal rule (ties count one half).

    Raises:
        ValueError: as :func:`roc_curve`.
    """
    fpr, tpr, _ = roc_curve(y_true, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def one_vs_rest_auc(y_true: Sequence[int], probs: np.ndarray) -> tuple[np.ndarray, float]:
    """AUC of each class against the rest, and their macro mean.

    Args:
        y_true: Int[N] in ``[0, K)``.
        probs: Float[N, K] class probabilities.

    Returns:
        Float64[K] per-class AUC (NaN for a class with no positive or no negative case) and the
        macro mean over the classes where it is defined (NaN when none is).
    """
    probs = _probabilities(probs)
    y = _labels(y_true, probs.shape[1], "y_true")
    aucs = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        positives = y == k
        if positives.any() and not positives.all():
            aucs[k] = roc_auc(positives, probs[:, k])
    defined = aucs[~np.isnan(aucs)]
    return aucs, float(defined.mean()) if defined.size else math.nan


def classification_report(y_true: Sequence[int], probs: np.ndarray) -> dict:
    """Every metric of the evaluation report, with predictions taken as the arg-max class.

    Args:
        y_true: Int[N] true classes in ``[0, K)``.
        probs: Float[N, K] class probabilities.

    Returns:
        dict with ``n``, ``confusion_matrix`` (Int[K, K]), ``class_sensitivity_matrix`` (row
        normalised), ``accuracy``, per-class ``sensitivity``/``specificity``/``ppv``/``f1``/``auc``
        (Float[K]) and ``macro_auc``.
    """
    probs = _probabilities(probs)
    num_classes = probs.shape[1]
    matrix = confusion_matrix(y_true, probs.argmax(axis=1), num_classes=num_classes)
    aucs, macro = one_vs_rest_auc(y_true, probs)
    total = matrix.sum()
    return {"n": int(total), "confusion_matrix": matrix, "class_sensitivity_matrix": row_normalised(matrix),
            "accuracy": float(np.trace(matrix) / total) if total else math.nan,
            **per_class_rates(matrix), "auc": aucs, "macro_auc": macro}


def aggregate_probabilities(probs: np.ndarray, labels: Sequence[int], groups: Sequence[str]
                            ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Average the slice probabilities of each group (scan or patient).

    Args:
        probs: Float[N, K] slice probabilities.
        labels: Int[N] slice classes.
        groups: N group keys (e.g. ``"<patient>/<scan>"``).

    Returns:
        Float[G, K] mean probabilities, Int[G] group classes and the G keys in first-seen order.

    Raises:
        ValueError: when the lengths differ or the slices of one group carry different classes.
    """
    probs, labels = _probabilities(probs), np.asarray(labels, dtype=np.int64)
    if not (len(probs) == len(labels) == len(groups)):
        raise ValueError(f"probs ({len(probs)}), labels ({len(labels)}) and groups ({len(groups)}) differ in length")
    members: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(str(key), []).append(i)
    mixed = [key for key, rows in members.items() if len(set(labels[rows].tolist())) > 1]
    if mixed:
        raise ValueError(f"slices of group(s) {mixed[:5]} carry different classes; cannot aggregate them")
    means = np.stack([probs[rows].mean(axis=0) for rows in members.values()]) if members else probs[:0]
    group_labels = np.array([labels[rows[0]] for rows in members.values()], dtype=np.int64)
    return means, group_labels, list(members)


def format_report(report: dict, *, class_names: Sequence[str], level: str = "slice") -> str:
    """The printed report: the original's three blocks, then per-class rates and AUC.

    Args:
        report: a dict from :func:`classification_report`.
        class_names: K names, e.g. ``("Control", "CP", "COVID-19")``.
        level: what one case is (slice, scan or patient), shown in the header.
    """
    rule = "-" * 60
    names = list(class_names)
    lines = [rule, f"Confusion matrix ({report['n']} {level}s; rows: true, columns: predicted):",
             _table(names, report["confusion_matrix"], "{:d}"), rule,
             "Class sensitivity (rows normalised):", _table(names, report["class_sensitivity_matrix"], "{:.4f}"),
             rule, f"Overall accuracy: {_fmt(report['accuracy'])}", rule,
             f"{'class':<12}" + "".join(f"{h:>13}" for h in ("sensitivity", "specificity", "PPV", "F1", "AUC"))]
    for k, name in enumerate(names):
        values = [report[key][k] for key in ("sensitivity", "specificity", "ppv", "f1", "auc")]
        lines.append(f"{name:<12}" + "".join(f"{_fmt(v):>13}" for v in values))
    lines += [f"Macro one-vs-rest ROC AUC: {_fmt(report['macro_auc'])}", rule]
    return "\n".join(lines)


def to_jsonable(value):
    """Arrays to lists and NaN to None, recursively, for ``metrics.json``."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, list, tuple)):
        return [to_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    return value


def _table(names: list[str], matrix: np.ndarray, cell: str) -> str:
    width = max(10, *(len(n) + 2 for n in names))
    header = " " * width + "".join(f"{n:>{width}}" for n in names)
    rows = [f"{name:<{width}}" + "".join(f"{_fmt(v, cell):>{width}}" for v in row) for name, row in zip(names, matrix)]
    return "\n".join([header, *rows])


def _fmt(value, cell: str = "{:.4f}") -> str:
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return "n/a"
    return cell.format(int(value) if cell == "{:d}" else float(value))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _labels(values: Sequence[int], num_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool):
        raise ValueError(f"{name} must hold integer classes, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} holds classes outside [0, {num_classes}): min {arr.min()}, max {arr.max()}")
    return arr


def _probabilities(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be Float[N, K] with K >= 2, got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs holds NaN or infinite values")
    return probs


def _binary_inputs(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} must be 1-D of equal length")
    if y.all() or not y.any():
        raise ValueError("ROC needs at least one positive and one negative case")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    return y, s
