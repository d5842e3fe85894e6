"""Pulmonary vessel trees: grown once per patient in 3D, cut by each slice.

A tree is grown from each hilum by recursive bisection of a cloud of target points drawn inside the
lung: a branch runs toward the centroid of its points, the cloud is split across its longest axis and
each half grows a child branch. Radii follow Murray's law (radius ~ number of targets ** 1/3). The
tree is stored as densely sampled centre-line points, so a slice at height ``z`` shows round dots
where vessels cross it and branching lines where they run in plane.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import LUNG_HEIGHT, ChestAnatomy, lung_labels

ROOT_RADIUS = 0.04  # hilar vessel radius, in units of half the field of view
MIN_RADIUS = 0.004
STEP = 0.004  # centre-line sampling step


@dataclass(frozen=True)
class VesselTree:
    """Centre-line samples of both lungs' vessel trees.

    Attributes:
        points: float32 [N, 3] positions (u, v, z) with ``z = t * LUNG_HEIGHT``.
        radius: float32 [N] vessel radius at each sample.
    """

    points: np.ndarray
    radius: np.ndarray


def sample_in_lung(a: ChestAnatomy, side: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points (u, v, z) drawn uniformly inside one lung (side 0 left, 1 right)."""
    found, total = [], 0
    for _ in range(50):
        u = a.lung_cu[side] + rng.uniform(-1.1, 1.1, 4 * n) * a.lung_ax[side]
        v = a.lung_cv + rng.uniform(-1.1, 1.1, 4 * n) * a.lung_ay
        t = rng.uniform(0.0, 1.0, 4 * n)
        labels, level = lung_labels(a, u, v, t)
        keep = (labels == side + 1) & (level > 0.04)
        found.append(np.stack([u[keep], v[keep], t[keep] * LUNG_HEIGHT], 1))
        total += int(keep.sum())
        if total >= n:
            break
    pts = np.concatenate(found)
    if len(pts) < n:
        raise RuntimeError(f"could not place {n} vessel targets in lung {side} (found {len(pts)})")
    return pts[:n]


def _segment(p0: np.ndarray, p1: np.ndarray, r: float, out: list) -> None:
    out.append((p0, p1, r))


def sample_segments(segments: list) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points every ``STEP`` along segments ``(p0, p1, radius)``: ([N, 3], [N])."""
    p0 = np.array([s[0] for s in segments])
    p1 = np.array([s[1] for s in segments])
    radius = np.array([s[2] for s in segments])
    n = np.maximum(2, np.ceil(np.linalg.norm(p1 - p0, axis=1) / STEP).astype(int) + 1)
    seg = np.repeat(np.arange(len(segments)), n)
    w = (np.arange(len(seg)) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n - 1, n)
    return p0[seg] + w[:, None] * (p1 - p0)[seg], radius[seg]


def grow_tree(hilum: np.ndarray, targets: np.ndarray, rng: np.random.Generator, out: list) -> None:
    """Grow one tree from ``hilum`` toward ``targets`` [M, 3], appending segments to ``out``."""
    total = len(targets)
    stack = [(hilum, targets)]
    while stack:
        start, pts = stack.pop()
        radius = max(MIN_RADIUS, ROOT_RADIUS * (len(pts) / total) ** (1 / 3))
        if len(pts) == 1:
            _segment(start, pts[0], radius, out)
            continue
        centre = pts.mean(0)
        end = start + rng.uniform(0.45, 0.7) * (centre - start)
        _segment(start, end, radius, out)
        order = np.argsort(pts[:, int(np.argmax(np.ptp(pts, 0)))])
        half = len(pts) // 2
        stack.append((end, pts[order[:half]]))
        stack.append((end, pts[order[half:]]))


def make_vessel_tree(a: ChestAnatomy, rng: np.random.Generator, *, n_targets: int = 1024) -> VesselTree:
    """Vessel trees of both lungs of one patient."""
    out: list = []
    c, s = np.cos(a.rotation), np.sin(a.rotation)
    for side in (0, 1):
        pu, pv = 0.6 * a.lung_cu[side], a.spine_v - 0.25
        hilum = np.array([c * pu - s * pv, s * pu + c * pv, 0.55 * LUNG_HEIGHT])
        grow_tree(hilum, sample_in_lung(a, side, n_targets, rng), rng, out)
    points, radius = sample_segments(out)
    return VesselTree(points=points.astype(np.float32), radius=radius.astype(np.float32))


def vessel_fraction(tree: VesselTree, t: float, shape: tuple[int, int], px: float) -> np.ndarray:
    """Fraction of each pixel covered by vessel in the slice at height ``t``.

    Args:
        tree: the patient's vessel tree.
        t: body-axis position of the slice.
        shape: (H, W) of the slice.
        px: pixel size in units of half the field of view (``2 / min(H, W)``).

    Returns:
        float32 [H, W] in [0, 1].
    """
    H, W = shape
    dz = tree.points[:, 2] - t * LUNG_HEIGHT
    near = np.abs(dz) < tree.radius + 0.5 * px
    out = np.zeros(shape, np.float32)
    if not near.any():
        return out
    pts, r = tree.points[near], np.sqrt(np.maximum(tree.radius[near] ** 2 - dz[near] ** 2, 0)) / px
    cols = np.round(pts[:, 0] / px + W / 2 - 0.5).astype(int)
    rows = np.round(pts[:, 1] / px + H / 2 - 0.5).astype(int)
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    rows, cols, r = rows[inside], cols[inside], r[inside]
    small = r < 0.75
    np.maximum.at(out, (rows[small], cols[small]), np.clip(2.0 * r[small], 0.05, 1.0))  # a line of width 2r
    for lo, hi in ((0.75, 2.0), (2.0, 5.0), (5.0, np.inf)):
        sel = (r >= lo) & (r < hi)
        if sel.any():
            out = np.maximum(out, _disks(rows[sel], cols[sel], r[sel], shape))
    return out


def _disks(rows, cols, radii, shape) -> np.ndarray:
    """Union of disks (approximately: each pixel takes the radius of its nearest centre)."""
    pad = int(np.ceil(radii.max())) + 1
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, shape[1])
    seeds = np.ones((r1 - r0, c1 - c0), bool)
    rad = np.zeros(seeds.shape, np.float32)
    seeds[rows - r0, cols - c0] = False
    np.maximum.at(rad, (rows - r0, cols - c0), radii)
    dist, (ir, ic) = ndimage.distance_transform_edt(seeds, return_indices=True)
    out = np.zeros(shape, np.float32)
    out[r0:r1, c0:c1] = np.clip(rad[ir, ic] + 0.5 - dist, 0, 1)
    return out
