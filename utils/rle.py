"""COCO run-length encoding (RLE) of binary masks, in numpy, byte-identical to pycocotools.

A COCO RLE is ``{"size": [H, W], "counts": str}``. The mask is read in column-major (Fortran) order
and cut into alternating runs of 0s and 1s, starting with 0s (so the first run is empty when the
first pixel is 1). The run lengths are then written as a string: from the fourth run on, each
length is replaced by its difference with the length two runs before, and every value is written
in 5-bit groups, least significant first, as characters ``48 + group`` (``+32`` when another group
follows), like a 6-bit LEB128. pycocotools is only a test dependency, so this module re-implements
``pycocotools.mask.encode`` / ``decode`` / ``area``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_MAX_GROUPS = 13  # enough 5-bit groups for any signed 64-bit value


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
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
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
