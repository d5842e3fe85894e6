"""COCO mask utilities in numpy, equal to pycocotools.mask: RLE encoding and IoU of masks and boxes.

A COCO RLE is ``{"size": [H, W], "counts": str}``. The mask is read in column-major (Fortran) order
and cut into alternating runs of 0s and 1s, starting with 0s (so the first run is empty when the
first pixel is 1). The run lengths are then written as a string: from the fourth run on, each
length is replaced by its difference with the length two runs before, and every value is written
in 5-bit groups, least significant first, as characters ``48 + group`` (``+32`` when another group
follows), like a 6-bit LEB128. pycocotools is only a test dependency, so this module re-implements
``pycocotools.mask.encode`` / ``decode`` / ``area``, and ``iou`` (:func:`mask_iou_coco` straight from
dense masks, :func:`box_iou_coco`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_MAX_GROUPS = 13  # enough 5-bit groups for any signed 64-bit value


def to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CPU numpy view of a tensor (bfloat16 becomes float32, which numpy lacks)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """COCO compressed RLE of each mask, equal to ``pycocotools.mask.encode``.

    Args:
        masks: Bool/UInt8[N, H, W] tensor (any device) or array; a pixel is foreground when it is
            non-zero.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}``.

    Raises:
        ValueError: when ``masks`` is not 3-D.
    """
    masks = to_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [N, H, W], got shape {tuple(masks.shape)}")
    n, h, w = masks.shape
    return [{"size": [h, w], "counts": counts_to_string(c)} for c in mask_runs(masks)]


def mask_runs(masks: np.ndarray) -> list[np.ndarray]:
    """Column-major run lengths of each mask (0-runs first), the uncompressed COCO RLE counts.

    Args:
        masks: Bool/UInt8[N, H, W]; non-zero is foreground.

    Returns:
        N Int64 arrays of run lengths that sum to H * W.
    """
    n, h, w = masks.shape
    if h * w == 0:
        return [np.zeros(1, dtype=np.int64) for _ in range(n)]
    flat = (masks != 0).transpose(0, 2, 1).reshape(n, h * w)  # [N, W, H] -> [N, W*H], column-major
    changes = flat[:, 1:] != flat[:, :-1]
    mask_idx, pos = np.nonzero(changes)
    starts_one = flat[:, 0]
    runs = []
    splits = np.searchsorted(mask_idx, np.arange(n + 1))
    for i in range(n):
        cuts = pos[splits[i]:splits[i + 1]] + 1
        edges = np.concatenate(([0], cuts, [h * w]))
        counts = np.diff(edges)
        runs.append(np.concatenate(([0], counts)) if starts_one[i] else counts)
    return runs


def counts_to_string(counts: Sequence[int] | np.ndarray) -> str:
    """COCO's compressed string of run lengths (pycocotools' ``rleToString``).

    Args:
        counts: Int[R] run lengths.

    Returns:
        The ASCII string.
    """
    x = np.asarray(counts, dtype=np.int64).copy()
    if x.size > 3:
        x[3:] -= np.asarray(counts, dtype=np.int64)[1:-2]  # delta with the run two places back
    shifts = 5 * np.arange(_MAX_GROUPS, dtype=np.int64)
    shifted = x[:, None] >> shifts[None, :]  # [R, G] arithmetic shifts, like C's long >>= 5
    groups = shifted & 0x1F
    rest = np.concatenate((shifted[:, 1:], shifted[:, -1:] >> 5), axis=1)  # value after each group
    more = np.where(groups & 0x10, rest != -1, rest != 0)
    n_chars = np.argmin(more, axis=1) + 1  # the first group after which nothing more follows
    keep = np.arange(_MAX_GROUPS)[None, :] < n_chars[:, None]
    chars = 48 + groups + 32 * (more & keep)
    return chars[keep].astype(np.uint8).tobytes().decode("ascii")


def string_to_counts(s: str) -> np.ndarray:
    """Run lengths from COCO's compressed string (pycocotools' ``rleFrString``).

    Args:
        s: the ``counts`` string of a compressed RLE.

    Returns:
        Int64[R] run lengths.

    Raises:
        ValueError: for characters outside the encoding's range or a truncated last value.
    """
    c = np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if c.size and (c.min() < 0 or c.max() > 63):
        raise ValueError(f"RLE string has characters outside '0'..'o': {s[:40]!r}")
    more = (c & 0x20) != 0
    if c.size and more[-1]:
        raise ValueError(f"RLE string ends in the middle of a value: {s[-40:]!r}")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    value_id = np.repeat(np.arange(ends.size), ends - starts + 1)
    k = np.arange(c.size) - starts[value_id]  # group index inside its value
    x = np.zeros(ends.size, dtype=np.int64)
    np.add.at(x, value_id, (c & 0x1F) << (5 * k))
    negative = (c[ends] & 0x10) != 0
    x[negative] |= -1 << (5 * (k[ends[negative]] + 1))
    counts = x.copy()
    if x.size > 3:  # undo the deltas: counts[i] = x[i] + counts[i - 2] from i = 3 on
        counts[3::2] = x[1] + np.cumsum(x[3::2])
        counts[4::2] = x[2] + np.cumsum(x[4::2])
    return counts


def rle_counts(rle: dict) -> np.ndarray:
    """Run lengths of a compressed (string) or uncompressed (list) COCO RLE, checked against its size.

    Raises:
        ValueError: when the RLE has no ``size``/``counts`` or the runs do not cover H * W pixels.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts', got {type(rle).__name__}")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    counts = string_to_counts(counts) if isinstance(counts, str) else np.asarray(counts, dtype=np.int64)
    h, w = (int(v) for v in rle["size"])
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"RLE runs sum to {counts.sum()} pixels, but its size {h}x{w} has {h * w}")
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """The binary mask of a COCO RLE (compressed or uncompressed), like ``pycocotools.mask.decode``.

    Args:
        rle: ``{"size": [H, W], "counts": str | list[int]}``.

    Returns:
        UInt8[H, W] with values 0/1.
    """
    counts = rle_counts(rle)
    h, w = (int(v) for v in rle["size"])
    values = (np.arange(counts.size) % 2).astype(np.uint8)
    return np.repeat(values, counts).reshape(w, h).T.copy()  # column-major runs -> [H, W]


def rle_area(rle: dict) -> int:
    """Foreground pixel count of a COCO RLE (``pycocotools.mask.area``)."""
    return int(rle_counts(rle)[1::2].sum())


# --------------------------------------------------------------------------- IoU (pycocotools.mask.iou)

def box_iou_coco(boxes1: torch.Tensor | np.ndarray, boxes2: torch.Tensor | np.ndarray, *,
                 crowd: np.ndarray | None = None) -> np.ndarray:
    """Box IoU as pycocotools computes it (``bbIou``): continuous coordinates, no +1.

    Args:
        boxes1: Float[N, 4] detections, xyxy pixels.
        boxes2: Float[M, 4] ground truth, xyxy pixels.
        crowd: Bool[M]; for a crowd box the union is the detection's area.

    Returns:
        Float64[N, M] IoU.
    """
    d = _xywh(boxes1)[:, None, :]  # [N, 1, 4]
    g = _xywh(boxes2)[None, :, :]  # [1, M, 4]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    return _iou_from_counts(inter, d[..., 2] * d[..., 3], g[..., 2] * g[..., 3], crowd)


def _xywh(boxes) -> np.ndarray:
    b = to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def mask_iou_coco(pred_masks: torch.Tensor | np.ndarray, gt_masks: torch.Tensor | np.ndarray, *,
                  crowd: np.ndarray | None = None, mask_threshold: float = 0.5) -> np.ndarray:
    """Mask IoU as pycocotools computes it (``rleIou``), straight from dense masks.

    On CPU every mask is read once in full (its row maxima), then only inside its bounding box, and
    pixels are only compared where two boxes overlap. On CUDA the intersections are one exact
    (float64) matrix product over the window that holds all foreground.

    Args:
        pred_masks: Float/UInt8/Bool[N, H, W]; foreground where ``> mask_threshold``.
        gt_masks: UInt8/Bool[M, H, W]; foreground where ``> 0``. Same device as ``pred_masks``
            (tensors on any device, or arrays).
        crowd: Bool[M]; for a crowd mask the union is the detection's area.
        mask_threshold: binarisation threshold of ``pred_masks``.

    Returns:
        Float64[N, M] IoU (0 where the masks do not intersect).
    """
    if pred_masks.shape[0] == 0 or gt_masks.shape[0] == 0:
        return np.zeros((pred_masks.shape[0], gt_masks.shape[0]))
    on_gpu = isinstance(pred_masks, torch.Tensor) and pred_masks.device.type != "cpu"
    count = _intersections_in_window if on_gpu else _intersections_by_box
    inter, area_p, area_g = count(pred_masks, gt_masks, mask_threshold)
    return _iou_from_counts(inter, area_p[:, None], area_g[None, :], crowd)


def _iou_from_counts(inter: np.ndarray, area_d: np.ndarray, area_g: np.ndarray, crowd) -> np.ndarray:
    """intersection / union, the union of a crowd GT being the detection's area; 0 without intersection."""
    union = area_d + area_g - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, dtype=bool)[None, :], area_d, union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def _binary_crops(masks: np.ndarray, threshold: float) -> tuple[list, np.ndarray]:
    """Each mask's foreground (``> threshold``) cut to its bounding box.

    Returns:
        K Bool crops (None for an empty mask) and Int64[K, 4] boxes (y0, y1, x0, x1), end exclusive,
        all zero for an empty mask.
    """
    rows = masks.max(axis=2) > threshold  # [K, H]: the one full pass over the masks
    y0, y1 = rows.argmax(axis=1), rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    boxes = np.zeros((masks.shape[0], 4), dtype=np.int64)
    crops = []
    for k in range(masks.shape[0]):
        if not rows[k, y0[k]]:
            crops.append(None)
            continue
        band = masks[k, y0[k]:y1[k]]
        cols = band.max(axis=0) > threshold
        x0, x1 = cols.argmax(), cols.size - cols[::-1].argmax()
        crops.append(band[:, x0:x1] > threshold)
        boxes[k] = y0[k], y1[k], x0, x1
    return crops, boxes


def _intersections_by_box(pred_masks, gt_masks, mask_threshold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64[N, M] intersections and the areas Float64[N], Float64[M], from per-mask crops (CPU)."""
    p_crops, pb = _binary_crops(to_numpy(pred_masks), mask_threshold)
    g_crops, gb = _binary_crops(to_numpy(gt_masks), 0)
    y0, y1 = np.maximum(pb[:, None, 0], gb[None, :, 0]), np.minimum(pb[:, None, 1], gb[None, :, 1])
    x0, x1 = np.maximum(pb[:, None, 2], gb[None, :, 2]), np.minimum(pb[:, None, 3], gb[None, :, 3])
    inter = np.zeros((len(p_crops), len(g_crops)))
    for n, m in zip(*np.nonzero((y0 < y1) & (x0 < x1))):
        a = p_crops[n][y0[n, m] - pb[n, 0]:y1[n, m] - pb[n, 0], x0[n, m] - pb[n, 2]:x1[n, m] - pb[n, 2]]
        b = g_crops[m][y0[n, m] - gb[m, 0]:y1[n, m] - gb[m, 0], x0[n, m] - gb[m, 2]:x1[n, m] - gb[m, 2]]
        inter[n, m] = np.count_nonzero(a & b)
    def area(crops):
        return np.array([0 if c is None else np.count_nonzero(c) for c in crops], dtype=np.float64)

    return inter, area(p_crops), area(g_crops)


def _intersections_in_window(pred_masks, gt_masks, mask_threshold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same as :func:`_intersections_by_box` as one float64 matrix product (exact, no TF32) on any device."""
    fg = (pred_masks > mask_threshold).any(0) | (gt_masks > 0).any(0)  # [H, W]
    rows, cols = torch.nonzero(fg.any(1)).flatten(), torch.nonzero(fg.any(0)).flatten()
    if rows.numel() == 0:
        return np.zeros((pred_masks.shape[0], gt_masks.shape[0])), np.zeros(pred_masks.shape[0]), \
            np.zeros(gt_masks.shape[0])
    window = (slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    p = (pred_masks[window] > mask_threshold).flatten(1).double()  # [N, h*w]
    g = (gt_masks[window] > 0).flatten(1).double()  # [M, h*w]
    return (p @ g.T).cpu().numpy(), p.sum(1).cpu().numpy(), g.sum(1).cpu().numpy()
