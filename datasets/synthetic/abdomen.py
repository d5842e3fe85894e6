"""BTCV-like abdominal phantom: 13 organs as smooth, slightly irregular shapes with contrast-phase HU.

Organ label indices follow BTCV (``ORGAN_NAMES[i]`` is label ``i``; 0 is background). The body
axis covers the upper abdomen from the lower kidney poles (inferior) to the oesophageal hiatus
(superior); anatomy is laid out in normalised coordinates of the field of view, so any shape and
spacing give a whole upper abdomen.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .volumes import check_volume_args, orient

ORGAN_NAMES = (
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver",
    "stomach", "aorta", "inferior vena cava", "portal and splenic veins", "pancreas",
    "right adrenal gland", "left adrenal gland",
)
# Mean HU of each label in a portal-venous phase scan (index = label).
ORGAN_HU = (0.0, 115.0, 170.0, 170.0, 12.0, 45.0, 105.0, 35.0, 165.0, 130.0, 160.0, 95.0, 50.0, 50.0)
# Ellipsoids: label, centre (u, v, t), half-axes (u, v, t). u: patient right (-) to left (+);
# v: anterior (-) to posterior (+); t: 0 inferior to 1 superior. Painted in this order.
_ELLIPSOIDS = (
    (6, (-0.30, -0.02, 0.72), (0.42, 0.40, 0.34)),
    (7, (0.30, -0.12, 0.72), (0.20, 0.16, 0.20)),
    (1, (0.52, 0.22, 0.70), (0.13, 0.20, 0.20)),
    (2, (-0.32, 0.33, 0.36), (0.10, 0.12, 0.22)),
    (3, (0.32, 0.32, 0.42), (0.10, 0.12, 0.22)),
    (4, (-0.26, -0.22, 0.52), (0.06, 0.08, 0.12)),
    (11, (0.08, 0.06, 0.55), (0.30, 0.055, 0.07)),
    (12, (-0.20, 0.28, 0.64), (0.03, 0.05, 0.07)),
    (13, (0.19, 0.27, 0.62), (0.03, 0.05, 0.07)),
)
# Tubes: label, centre (u, v), radius, t range.
_TUBES = ((8, (0.06, 0.30), 0.065, (0.0, 1.0)), (9, (-0.12, 0.24), 0.055, (0.0, 0.86)),
          (5, (0.07, 0.22), 0.03, (0.84, 1.0)))


def _wave_noise(rng, shape, grids, scale: float) -> np.ndarray:
    """Sum of random plane waves of wavelength ~``scale`` (unit variance)."""
    out = np.zeros(shape, np.float32)
    for _ in range(5):
        w = rng.normal(0, 2 * np.pi / scale, 3)
        out = out + np.cos(w[0] * grids[0] + w[1] * grids[1] + w[2] * grids[2] + rng.uniform(0, 2 * np.pi))
    return (out * np.sqrt(2 / 5)).astype(np.float32)


def _organ_fields(rng, t, v, u):
    """Label map [Z, Y, X] of the organs (later entries overwrite earlier ones)."""
    shape = (len(t), len(v), len(u))
    grids = (u[None, None, :], v[None, :, None], t[:, None, None])
    label = np.zeros(shape, np.uint8)
    jitter = lambda: rng.uniform(-0.03, 0.03, 3)  # noqa: E731
    for idx, centre, axes in _ELLIPSOIDS:
        c, r = np.add(centre, jitter()), np.multiply(axes, rng.uniform(0.85, 1.15, 3))
        q = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r))
        label[(1 - np.sqrt(q) + 0.12 * _wave_noise(rng, (1, 1, 1), grids, 0.5)) > 0] = idx
    _portal(label, grids, rng)
    for idx, (cu, cv), rad, (t0, t1) in _TUBES:
        cu, cv = cu + rng.uniform(-0.02, 0.02), cv + rng.uniform(-0.02, 0.02)
        inside = (np.hypot(grids[0] - cu, grids[1] - cv) < rad) & (grids[2] >= t0) & (grids[2] <= t1)
        label[inside] = idx
    return label


def _portal(label, grids, rng) -> None:
    """Portal vein (oblique, toward the liver hilum) joined by the splenic vein along the pancreas."""
    u, v, t = grids
    t0 = 0.6 + rng.uniform(-0.03, 0.03)
    splenic = (np.abs(v - 0.12 - 0.1 * u) < 0.025) & (u > -0.1) & (u < 0.45) & (np.abs(t - t0) < 0.025)
    portal_u = -0.1 - 0.4 * (t - t0)
    portal = (np.hypot(u - portal_u, v - 0.08) < 0.03) & (t > t0 - 0.02) & (t < t0 + 0.22)
    label[splenic | portal] = 10


def _body(label, grids, rng) -> np.ndarray:
    """HU of the body: fat, muscle wall, spine, bowel gas and fluid; organs filled in by label."""
    shape = label.shape
    u, v, t = np.broadcast_arrays(*grids)
    r = np.sqrt((u / 0.86) ** 2 + ((v - 0.02) / 0.66) ** 2)
    hu = np.full(shape, -1000.0, np.float32)
    hu[r < 1] = -100.0
    hu[(r < 0.93) & (r > 0.86)] = 50.0
    inner = r < 0.86
    bowel = _wave_noise(rng, shape, grids, 0.12)
    hu[inner] = np.where(bowel[inner] > 1.3, -900.0, np.where(bowel[inner] > -0.5, 30.0, -95.0))
    spine = np.hypot(u, (v - 0.45) / 0.9) < 0.1
    hu[spine] = 700.0
    hu[np.hypot(u, (v - 0.45) / 0.9) < 0.08] = 260.0
    for idx in range(1, len(ORGAN_NAMES)):
        hu[label == idx] = ORGAN_HU[idx]
    stomach_gas = (label == 7) & (v < -0.18)
    hu[stomach_gas] = -950.0
    return hu


def make_abdomen_volume(*, seed: int, shape=(96, 96, 64), spacing=(0.8, 0.8, 2.5), orientation: str = "RAS") -> dict:
    """An abdominal CT phantom with the 13 BTCV organs.

    Args:
        seed: patient seed.
        shape: (X, Y, Z) voxels.
        spacing: (sx, sy, sz) in mm.
        orientation: ``"RAS"`` or ``"LPS"`` voxel order (the affine always maps to RAS+ world).

    Returns:
        dict with ``image`` int16 [X, Y, Z] HU, ``label`` uint8 [X, Y, Z] in 0..13 (see
        ``ORGAN_NAMES``) and ``affine`` float64 [4, 4].

    Raises:
        ValueError: for a bad shape, spacing or orientation.
    """
    shape, spacing = check_volume_args(shape, spacing, orientation)
    X, Y, Z = shape
    rng = np.random.default_rng([int(seed), 21])
    half = min(X * spacing[0], Y * spacing[1]) / 2
    u = ((np.arange(X) + 0.5 - X / 2) * spacing[0] / half).astype(np.float32)
    v = ((np.arange(Y) + 0.5 - Y / 2) * spacing[1] / half).astype(np.float32)
    t = ((np.arange(Z) + 0.5) / Z).astype(np.float32)
    label = _organ_fields(rng, t, v, u)
    hu = _body(label, (u[None, None, :], v[None, :, None], t[:, None, None]), rng)
    hu = ndimage.gaussian_filter(hu, (0.5, 0.8, 0.8)) + rng.normal(0, 15, hu.shape).astype(np.float32)
    image, affine = orient(np.clip(np.round(hu), -1024, 3071).astype(np.int16), spacing, orientation, -350.0)
    label, _ = orient(label, spacing, orientation, -350.0)
    return dict(image=image, label=label, affine=affine)
