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
    body_ax, body_ay = rng.uniform(0.80, 0.92), rng.uniform(0.58, 0.70)
    fat, muscle = rng.uniform(0.03, 0.09), rng.uniform(0.04, 0.06)
    cav_ax = body_ax - fat - muscle - 0.03
    med = rng.uniform(0.09, 0.13)
    half = (cav_ax - med) / 2
    lung_ax = (half * rng.uniform(0.92, 1.0), half * rng.uniform(0.97, 1.05))
    body_cv = rng.uniform(-0.02, 0.05)
    harmonics = np.stack([rng.normal(0, 0.025, (2, 2, N_FOURIER)), rng.uniform(0, 2 * np.pi, (2, 2, N_FOURIER))], -1)
    return ChestAnatomy(
        body_ax=body_ax, body_ay=body_ay, body_cv=body_cv, fat=fat, muscle=muscle,
        rotation=float(np.deg2rad(rng.uniform(-4, 4))),
        lung_ax=lung_ax, lung_ay=(body_ay - fat - muscle - 0.03) * rng.uniform(0.86, 0.95),
        lung_cu=(med + lung_ax[0], -(med + lung_ax[1])), lung_cv=body_cv + rng.uniform(0.0, 0.05),
        lung_square=rng.uniform(0.03, 0.07), lung_harmonics=harmonics,
        dome_t=(rng.uniform(0.16, 0.26), rng.uniform(0.24, 0.34)),
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


def lung_labels(a: ChestAnatomy, u, v, t):
    """Lung label map (0 outside, 1 left, 2 right) and the level (distance-like, positive inside).

    Returns:
        (labels uint8, level float32) broadcast to the shape of ``u, v, t``.
    """
    levels = [lung_level(a, side, u, v, t) for side in (0, 1)]
    below = [t < diaphragm_t(a, side, u, v) for side in (0, 1)]
    pu, pv = rotate(a, u, v)
    excluded = (heart_level(a, u, v, t) > -0.25) | (np.hypot(pu, (pv - a.spine_v) * 1.1) < 0.16)
    excluded = excluded | (np.abs(pu) < 0.07 + 0.05 * (pv < a.spine_v))
    left = (levels[0] > 0) & ~below[0] & ~excluded
    right = (levels[1] > 0) & ~below[1] & ~excluded & ~left
    labels = np.where(left, 1, np.where(right, 2, 0)).astype(np.uint8)
    level = np.where(left, levels[0], np.where(right, levels[1], -1.0)).astype(np.float32)
    return labels, level
