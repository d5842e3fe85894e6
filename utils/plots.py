"""Pictures a person looks at: detection overlays, confusion matrices, ROC curves.

Matplotlib runs with the non-interactive Agg backend; every function writes a PNG and returns its path.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

# One colour per detection label (index 0, the background, is unused).
LABEL_COLOURS = ((0, 0, 0), (1.0, 0.85, 0.1), (1.0, 0.2, 0.2), (0.2, 0.6, 1.0), (0.3, 1.0, 0.3))


def detection_overlay(image: torch.Tensor, detections: dict, path: str | Path, *, class_names: tuple[str, ...],
                      mask_threshold: float = 0.5, title: str | None = None, alpha: float = 0.45) -> Path:
    """Draw lesion masks coloured by class, boxes with scores and a legend over a slice.

    Args:
        image: FloatTensor[3, H, W] or [H, W] in [0, 1].
        detections: dict with ``boxes`` Float[N, 4] xyxy, ``scores`` Float[N], ``labels`` Int64[N] and
            ``masks`` Float[N, 1, H, W] probabilities.
        path: output PNG.
        class_names: detection class names, background first.
        mask_threshold: probability above which a pixel belongs to the mask.
        title: optional title.
        alpha: mask opacity.
    """
    gray = image[0] if image.ndim == 3 else image
    rgb = np.repeat(gray.detach().cpu().float().numpy()[..., None], 3, axis=2)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(_blend_masks(rgb, detections, mask_threshold, alpha))
    _draw_boxes(ax, detections)
    present = sorted({int(label) for label in detections["labels"]})
    handles = [Patch(color=LABEL_COLOURS[c % len(LABEL_COLOURS)], label=class_names[c]) for c in present]
    ax.legend(handles=handles or [Patch(color="none", label="no lesion detected")], loc="lower right", fontsize=8)
    ax.set_title(title or "", fontsize=9)
    ax.axis("off")
    return _save(fig, path)


def _blend_masks(rgb: np.ndarray, detections: dict, threshold: float, alpha: float) -> np.ndarray:
    out = rgb.copy()
    masks = detections["masks"].detach().cpu()
    for mask, label in zip(masks, detections["labels"].tolist()):
        on = (mask[0] if mask.ndim == 3 else mask).numpy() > threshold
        out[on] = (1 - alpha) * out[on] + alpha * np.asarray(LABEL_COLOURS[label % len(LABEL_COLOURS)])
    return out.clip(0, 1)


def _draw_boxes(ax, detections: dict) -> None:
    for box, score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                 detections["labels"].tolist()):
        colour = LABEL_COLOURS[label % len(LABEL_COLOURS)]
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1))
        ax.text(x0, y0 - 1, f"{score:.2f}", color=colour, fontsize=6, va="bottom")


def confusion_matrix_plot(matrix: np.ndarray, path: str | Path, *, class_names: tuple[str, ...],
                          title: str = "Confusion matrix") -> Path:
    """Confusion matrix heat map with counts and row-normalised percentages.

    Args:
        matrix: Int[K, K], rows true class, columns predicted class.
    """
    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, f"{matrix[i, j]}\n{100 * norm[i, j]:.0f}%", ha="center", va="center",
                color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path, *,
             title: str = "ROC") -> Path:
    """ROC curves.

    Args:
        curves: name -> (false-positive rates, true-positive rates, AUC).
    """
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
