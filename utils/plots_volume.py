"""Montages of CT volumes: evenly spaced axial slices with a mask overlaid, written as PNG.

Volumes are first reoriented to RAS with nibabel (the file itself is not changed), so every montage
shows slices the same way whatever the input's orientation: patient's right on the image's left,
anterior up (radiological convention).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

MASK_COLOURS = ((0.0, 0.0, 0.0, 0.0), (1.0, 0.2, 0.2, 1.0), (0.2, 0.6, 1.0, 1.0), (1.0, 0.85, 0.1, 1.0))


def axial_montage(image: np.ndarray, mask: np.ndarray | None, path: str | Path, *, affine: np.ndarray,
                  window: tuple[float, float] = (-1500.0, 500.0), n_slices: int = 12, columns: int = 4,
                  title: str | None = None, alpha: float = 0.4, z_range: tuple[int, int] | None = None,
                  colours: Sequence[tuple[float, float, float, float]] = MASK_COLOURS,
                  legend: dict[int, str] | None = None) -> Path:
    """Write a grid of axial slices with ``mask`` (labels > 0) coloured on top.

    Args:
        image: Float[X, Y, Z] intensities in HU on the grid of ``affine``.
        mask: Int[X, Y, Z] labels (0 background), same shape, or None.
        path: output PNG.
        affine: 4x4 voxel-to-world (RAS) matrix of ``image``.
        window: HU range mapped to black..white.
        n_slices: slices shown, evenly spaced over the volume.
        columns: slices per row.
        title: figure title.
        alpha: mask opacity.
        z_range: (first, last) axial slice, counted inferior to superior on the RAS grid, between
            which the slices are spread; None for the whole volume.
        colours: RGBA per label value (index 0 is background).
        legend: label value -> name, drawn under the figure; None for no legend.

    Raises:
        ValueError: when ``image`` is not 3D or ``mask`` has another shape.
    """
    if image.ndim != 3 or (mask is not None and mask.shape != image.shape):
        raise ValueError(f"need a 3D image and a mask of the same shape, got {image.shape} and "
                         f"{None if mask is None else mask.shape}")
    image, mask = to_ras(image, affine), None if mask is None else to_ras(mask, affine)
    first, last = z_range if z_range is not None else (0, image.shape[2] - 1)
    picks = np.unique(np.linspace(first, last, min(n_slices, last - first + 1)).round().astype(int))
    rows = int(np.ceil(len(picks) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, z in zip(axes.flat, picks):
        _draw_slice(ax, image[:, :, z], None if mask is None else mask[:, :, z], window, alpha, colours)
        ax.set_title(f"z={z}", fontsize=8)
    if title:
        fig.suptitle(title)
    if legend:
        handles = [Patch(color=colours[v][:3], label=name) for v, name in legend.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def display_slices(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Axial slices as a reader sees them (radiological convention), inferior to superior.

    Args:
        volume: Array[X, Y, Z] on the grid of ``affine`` (voxel -> RAS+ mm).

    Returns:
        Array[Z, rows, cols] (a view where possible): anterior up, the patient's right on the left.
    """
    return display_plane(np.moveaxis(to_ras(volume, affine), 2, 0))


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Array[X, Y, Z] on the grid of ``affine`` reoriented to RAS (a view where possible)."""
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(volume, ornt)


def display_plane(plane: np.ndarray) -> np.ndarray:
    """RAS slice(s) [..., x, y] -> picture [..., rows, cols]: anterior up, the patient's right on the left.

    x grows to the patient's right and y to anterior; the last two axes are swapped so that y runs
    down the rows, then both are flipped. The one display flip of the project's volume pictures.
    """
    return np.flip(np.swapaxes(plane, -1, -2), axis=(-2, -1))


def _draw_slice(ax, image: np.ndarray, mask: np.ndarray | None, window: tuple[float, float], alpha: float,
                colours: Sequence[tuple[float, float, float, float]] = MASK_COLOURS) -> None:
    ax.imshow(display_plane(image), cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    if mask is not None and mask.any():
        labels = np.clip(mask.astype(int), 0, len(colours) - 1)
        rgba = np.asarray(colours, dtype=float)[display_plane(labels)]
        rgba[..., 3] *= alpha
        ax.imshow(rgba, interpolation="nearest")
