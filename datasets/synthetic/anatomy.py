"""Chest anatomy of one phantom patient: parameters drawn per patient, shapes as functions of position.

Positions are normalised: ``u`` runs from the patient's right (-1) to the patient's left (+1) across
the field of view, ``v`` from anterior (-1) to posterior (+1), both in units of half the field of
view, and ``t`` runs along the body axis from the lung bases (0) to the apices (1). One unit of
``t`` spans ``LUNG_HEIGHT`` units of ``u``. Every function takes broadcastable arrays, so the same
anatomy can be evaluated on a 2D slice, a 3D grid or a cloud of points.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LUNG_HEIGHT = 1.5  # apex-to-base lung height, in units of half the field of view
N_FOURIER = 4  # boundary harmonics (k = 2..5) of each lung


@dataclass(frozen=True)
class ChestAnatomy:
    """Anatomy of one patient (all lengths in units of half the field of view)."""

    body_ax: float
    body_ay: float
    body_cv: float
    fat: float
    muscle: float
    rotation: float
    lung_ax: tuple[float, float]  # (left, right) half-widths
    lung_ay: float
    lung_cu: tuple[float, float]
    lung_cv: float
    lung_square: float  # squareness of the lungs (amplitude of the 4th boundary harmonic)
    lung_harmonics: np.ndarray  # [2 sides, 2 (base, apex), N_FOURIER, 2 (amplitude, phase)]
    dome_t: tuple[float, float]  # diaphragm dome height (left, right)
    heart: tuple[float, float, float, float, float]  # u, v, t, in-plane radius, half height in t
    spine_v: float
    rib_phase: float
    lung_hu: float
    fat_hu: float
    noise_sd: float
    blur: float  # scanner blur sigma, in units of u


def sample_anatomy(rng: np.random.Generator) -> ChestAnatomy:
    """Draw one patient's anatomy (plain Python floats, so float32 grids stay float32)."""
    rng = _FloatRng(rng)
    body_ax, body_ay = rng.uniform(0.82, 0.93), rng.uniform(0.54, 0.64)
    fat, muscle = rng.uniform(0.03, 0.09), rng.uniform(0.04, 0.06)
    cav_ax = body_ax - fat - muscle - 0.03
    med = rng.uniform(0.05, 0.09)
    half = (cav_ax - med) / 2
    lung_ax = (half * rng.uniform(1.02, 1.12), half * rng.uniform(1.06, 1.16))  # clipped by the rib cage
    body_cv = rng.uniform(-0.02, 0.05)
    harmonics = np.stack([rng.normal(0, 0.025, (2, 2, N_FOURIER)), rng.uniform(0, 2 * np.pi, (2, 2, N_FOURIER))], -1)
    return ChestAnatomy(
        body_ax=body_ax, body_ay=body_ay, body_cv=body_cv, fat=fat, muscle=muscle,
        rotation=float(np.deg2rad(rng.uniform(-4, 4))),
        lung_ax=lung_ax, lung_ay=(body_ay - fat - muscle - 0.03) * rng.uniform(0.95, 1.05),
        lung_cu=(med + lung_ax[0], -(med + lung_ax[1])), lung_cv=body_cv + rng.uniform(0.0, 0.05),
        lung_square=rng.uniform(0.03, 0.07), lung_harmonics=harmonics,
        dome_t=(rng.uniform(0.12, 0.2), rng.uniform(0.18, 0.26)),
        heart=(rng.uniform(0.08, 0.16), body_cv + rng.uniform(-0.26, -0.18), rng.uniform(0.24, 0.32),
               rng.uniform(0.22, 0.27), rng.uniform(0.22, 0.28)),
        spine_v=body_cv + body_ay - fat - muscle - rng.uniform(0.17, 0.21),
        rib_phase=rng.uniform(0, 2 * np.pi),
        lung_hu=rng.uniform(-895, -865), fat_hu=rng.uniform(-115, -90),
        noise_sd=rng.uniform(10, 30), blur=rng.uniform(0.0020, 0.0040),
    )


class _FloatRng:
    """``uniform`` returning Python floats (NumPy scalars would promote float32 arrays)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def uniform(self, low, high, size=None):
        out = self.rng.uniform(low, high, size)
        return float(out) if size is None else out.astype(np.float32)

    def normal(self, loc, scale, size):
        return self.rng.normal(loc, scale, size).astype(np.float32)


def rotate(a: ChestAnatomy, u, v):
    """Patient coordinates (body axes) of field-of-view coordinates ``u, v``."""
    c, s = np.cos(a.rotation), np.sin(a.rotation)
    return c * u + s * v, -s * u + c * v


def ellipse_radius(du, dv, ax, ay, p: float = 2.0):
    """Normalised (super)elliptic radius: < 1 inside the ellipse of half-axes ``ax, ay``."""
    x, y = du / ax, dv / ay
    if p == 2.0:
        return np.sqrt(x * x + y * y)
    return (np.abs(x) ** p + np.abs(y) ** p) ** (1.0 / p)


def body_radius(a: ChestAnatomy, u, v, t):
    """Normalised radius of the body outline (1 = skin); the chest widens toward the shoulders."""
    pu, pv = rotate(a, u, v)
    grow = 1.0 + 0.06 * np.clip(np.asarray(t, np.float32) - 0.7, 0, None)
    return ellipse_radius(pu, pv - a.body_cv, a.body_ax * grow, a.body_ay)


def cavity_edge(a: ChestAnatomy) -> float:
    """Body radius (``body_radius`` units) of the inner chest wall, where the ribs and pleura lie."""
    return 1.0 - (a.fat + a.muscle) / a.body_ax


def lung_scale(t):
    """In-plane size of the lungs along the body axis: 1 at the base, narrowing to 0 at the apex."""
    x = np.clip((np.asarray(t, dtype=np.float32) - 0.30) / 0.72, 0, None)
    return np.sqrt(np.clip(1 - x * x, 0, 1))


def lung_level(a: ChestAnatomy, side: int, u, v, t):
    """Level of one lung (side 0 left, 1 right) before exclusions: positive inside, ~1 at the core."""
    pu, pv = rotate(a, u, v)
    du, dv = pu - a.lung_cu[side], pv - a.lung_cv
    s = np.maximum(lung_scale(t), 1e-3)
    theta = np.arctan2(dv, du if side == 0 else -du)
    h = a.lung_harmonics[side]
    tt = np.clip(t, 0, 1)
    pert = 1.0 - a.lung_square * np.cos(4 * theta)
    for k in range(N_FOURIER):
        amp = h[0, k, 0] + (h[1, k, 0] - h[0, k, 0]) * tt
        pert = pert + amp * np.cos((k + 2) * theta + h[0, k, 1])
    rho = ellipse_radius(du, dv, a.lung_ax[side] * s, a.lung_ay * s) / pert
    return 1.0 - rho


def diaphragm_t(a: ChestAnatomy, side: int, u, v):
    """Height ``t`` of the diaphragm under one lung (lower at the posterior and lateral recesses)."""
    pu, pv = rotate(a, u, v)
    du = (pu - a.lung_cu[side]) / a.lung_ax[side]
    dv = (pv - a.lung_cv + 0.25 * a.lung_ay) / a.lung_ay
    return a.dome_t[side] - 0.28 * np.clip(du * du + dv * dv, 0, 2.0)


def heart_level(a: ChestAnatomy, u, v, t):
    """Level of the heart ellipsoid: positive inside."""
    hu, hv, ht, hr, hh = a.heart
    pu, pv = rotate(a, u, v)
    return 1.0 - ((pu - hu) / (hr * 1.15)) ** 2 - ((pv - hv) / (hr * 0.85)) ** 2 - ((t - ht) / hh) ** 2


def window(u, v, box):
    """Index slices (rows, cols) of the grid ``u`` [1, W], ``v`` [H, 1] inside ``box`` (u0, u1, v0, v1)."""
    cols = np.nonzero((u[0] >= box[0]) & (u[0] <= box[1]))[0]
    rows = np.nonzero((v[:, 0] >= box[2]) & (v[:, 0] <= box[3]))[0]
    if len(cols) == 0 or len(rows) == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def lung_box(a: ChestAnatomy) -> tuple[float, float, float, float]:
    """Box (u0, u1, v0, v1) that holds both lungs at any height."""
    reach = 1.25 + 4 * float(np.abs(a.lung_harmonics[..., 0]).max())
    return (a.lung_cu[1] - reach * a.lung_ax[1], a.lung_cu[0] + reach * a.lung_ax[0],
            a.lung_cv - reach * a.lung_ay, a.lung_cv + reach * a.lung_ay)


def lung_fields(a: ChestAnatomy, u, v, t) -> np.ndarray:
    """Smooth fields whose signs make the lungs: float32 [5, ...], a lung where all of a side's are > 0.

    Rows: left level, right level, height above the left and the right diaphragm, and the margin
    from the structures that no lung enters (heart, spine, the midline band).
    """
    pu, pv = rotate(a, u, v)
    midline = np.abs(pu) - (0.045 + 0.05 * np.clip((a.spine_v - pv) / 0.04, 0, 1))
    aorta = np.hypot(pu - 0.11, pv - a.spine_v + 0.1) - 0.075
    margin = np.minimum(np.minimum(-0.25 - heart_level(a, u, v, t), np.hypot(pu, (pv - a.spine_v) * 1.1) - 0.15),
                        np.minimum(midline, aorta))
    margin = np.minimum(margin, (cavity_edge(a) - 0.01 - body_radius(a, u, v, t)) * a.body_ax)
    fields = [lung_level(a, 0, u, v, t), lung_level(a, 1, u, v, t),
              t - diaphragm_t(a, 0, u, v), t - diaphragm_t(a, 1, u, v), margin]
    return np.stack(np.broadcast_arrays(*fields)).astype(np.float32)


def labels_from_fields(fields: np.ndarray):
    """Lung labels (0 outside, 1 left, 2 right) and level (positive inside) from ``lung_fields``."""
    left = (fields[0] > 0) & (fields[2] > 0) & (fields[4] > 0)
    right = (fields[1] > 0) & (fields[3] > 0) & (fields[4] > 0) & ~left
    labels = np.where(left, 1, np.where(right, 2, 0)).astype(np.uint8)
    level = np.where(left, fields[0], np.where(right, fields[1], -1.0)).astype(np.float32)
    return labels, level


def lung_labels(a: ChestAnatomy, u, v, t):
    """Lung label map (0 outside, 1 left, 2 right) and the level (distance-like, positive inside).

    Returns:
        (labels uint8, level float32) broadcast to the shape of ``u, v, t``.
    """
    return labels_from_fields(lung_fields(a, u, v, t))


def lung_labels_grid(a: ChestAnatomy, u: np.ndarray, v: np.ndarray, t: float, coarse: int = 96) -> np.ndarray:
    """Lung labels on the grid ``u`` [W] x ``v`` [H], the smooth fields evaluated on a coarser grid.

    Returns:
        uint8 [H, W] (0 outside, 1 left, 2 right).
    """
    if len(u) <= coarse and len(v) <= coarse:
        return lung_labels(a, u[None, :], v[:, None], t)[0]
    uc = np.linspace(u[0], u[-1], min(len(u), coarse), dtype=np.float32)
    vc = np.linspace(v[0], v[-1], min(len(v), coarse), dtype=np.float32)
    fields = lung_fields(a, uc[None, :], vc[:, None], t)
    return labels_from_fields(_resample(_resample(fields, uc, u, 2), vc, v, 1))[0]


def _resample(x: np.ndarray, src: np.ndarray, dst: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``x`` along ``axis`` from sample points ``src`` to ``dst`` (both increasing)."""
    pos = np.interp(dst, src, np.arange(len(src), dtype=np.float32))
    i0 = np.clip(np.floor(pos).astype(int), 0, len(src) - 2)
    w = (pos - i0).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = len(dst)
    w = w.reshape(shape)
    return np.take(x, i0, axis) * (1 - w) + np.take(x, i0 + 1, axis) * w
