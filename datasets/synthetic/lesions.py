"""Pneumonia lesions: irregular 3D blobs placed per class, cut by each slice and clipped to the lungs.

A lesion is an ellipsoid whose surface is roughened by a few random plane waves (smooth noise that is
continuous in 3D, so neighbouring slices of a volume agree), thresholded at zero:
``f(x) = 1 - |(x - c) / r| + roughness * noise(x)``, lesion where ``f > 0`` inside a lung.

Class patterns (CNCB classes):

- Control (0): no lesion.
- CP (1): one lobar or segmental consolidation in one lung, low and posterior, sometimes with a
  halo of ground-glass around it; a small lesion in the other lung now and then (mostly unilateral).
- COVID-19 (2): several peripheral, subpleural ground-glass opacities in both lungs, favouring the
  lower and posterior zones, some with consolidation inside.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import LUNG_HEIGHT, ChestAnatomy, lung_labels
from .vessels import sample_in_lung

LESION_GGO, LESION_CONSOLIDATION = 1, 2  # lesion label values of volumes
N_WAVES = 6


@dataclass(frozen=True)
class Lesion:
    """One lesion in (u, v, z) coordinates (``z = t * LUNG_HEIGHT``).

    Attributes:
        kind: ``LESION_GGO`` or ``LESION_CONSOLIDATION``.
        centre: float [3]; radii: float [3] (half-axes).
        waves: float [N_WAVES, 3] wave vectors (per unit of radius); phases: float [N_WAVES].
        roughness: amplitude of the boundary noise.
        hu: mean Hounsfield units of the lesion.
        side: lung of the centre (0 left, 1 right).
    """

    kind: int
    centre: np.ndarray
    radii: np.ndarray
    waves: np.ndarray
    phases: np.ndarray
    roughness: float
    hu: float
    side: int


def make_lesion(rng, kind: int, centre, radius: float, side: int, hu: float, roughness: float = 0.45) -> Lesion:
    """A lesion of mean radius ``radius`` with random anisotropy and boundary noise."""
    radii = radius * rng.uniform(0.75, 1.3, 3)
    return Lesion(kind=kind, centre=np.asarray(centre, float), radii=radii,
                  waves=rng.normal(0, 2.2, (N_WAVES, 3)), phases=rng.uniform(0, 2 * np.pi, N_WAVES),
                  roughness=roughness, hu=hu, side=side)


def _place(a: ChestAnatomy, side: int, rng, *, peripheral: bool, low: float = 1.0) -> np.ndarray:
    """A lesion centre inside one lung: subpleural when ``peripheral``; biased low and posterior."""
    pts = sample_in_lung(a, side, 160, rng)
    _, level = lung_labels(a, pts[:, 0], pts[:, 1], pts[:, 2] / LUNG_HEIGHT)
    weight = (1.3 - low * pts[:, 2] / LUNG_HEIGHT) * (1.5 + (pts[:, 1] - a.lung_cv) / a.lung_ay)
    weight = np.clip(weight, 0.05, None) * (np.exp(-((level - 0.08) / 0.06) ** 2) if peripheral else level)
    return pts[rng.choice(len(pts), p=weight / weight.sum())]


def _ggo_hu(rng) -> float:
    return float(rng.uniform(-640, -420))


def _cons_hu(rng) -> float:
    return float(rng.uniform(-60, 25))


def covid_lesions(a: ChestAnatomy, rng) -> list[Lesion]:
    """Bilateral, peripheral, multifocal ground-glass, some with consolidation inside."""
    out = []
    for side in (0, 1):
        for i in range(rng.integers(2, 6)):
            centre = _place(a, side, rng, peripheral=True)
            radius = float(np.exp(rng.uniform(np.log(0.09 if i == 0 else 0.03), np.log(0.22))))
            out.append(make_lesion(rng, LESION_GGO, centre, radius, side, _ggo_hu(rng)))
            if rng.random() < 0.35:
                out.append(make_lesion(rng, LESION_CONSOLIDATION, centre, 0.45 * radius, side, _cons_hu(rng), 0.35))
    return out


def cp_lesions(a: ChestAnatomy, rng, *, halo: bool | None = None) -> list[Lesion]:
    """Unilateral lobar/segmental consolidation, optionally with a ground-glass halo."""
    side = int(rng.integers(2))
    centre = _place(a, side, rng, peripheral=False, low=1.4)
    radius = float(rng.uniform(0.1, 0.24))
    out = [make_lesion(rng, LESION_CONSOLIDATION, centre, radius, side, _cons_hu(rng), 0.35)]
    if halo if halo is not None else rng.random() < 0.5:
        out.append(make_lesion(rng, LESION_GGO, centre, 1.4 * radius, side, _ggo_hu(rng) + 100, 0.4))
    if rng.random() < 0.15:
        other = 1 - side
        out.append(make_lesion(rng, LESION_GGO, _place(a, other, rng, peripheral=False), 0.05, other, _ggo_hu(rng)))
    return out


def sample_lesions(a: ChestAnatomy, cls: int, rng, *, halo: bool | None = None) -> list[Lesion]:
    """Lesions of one patient of class ``cls`` (0 Control, 1 CP, 2 COVID-19).

    Raises:
        ValueError: for a class other than 0, 1 or 2.
    """
    if cls not in (0, 1, 2):
        raise ValueError(f"cls must be 0 (Control), 1 (CP) or 2 (COVID-19), got {cls!r}")
    if cls == 0:
        return []
    return cp_lesions(a, rng, halo=halo) if cls == 1 else covid_lesions(a, rng)


def lesion_fields(lesions: list[Lesion], t: float, u: np.ndarray, v: np.ndarray):
    """Lesion label and target HU on one slice (before clipping to the lungs).

    Args:
        lesions: the patient's lesions.
        t: body-axis position of the slice.
        u: float [1, W] and v: float [H, 1] field-of-view coordinates.

    Returns:
        (label uint8 [H, W] with 0 none / 1 GGO / 2 consolidation, hu float32 [H, W],
        strength float32 [H, W] in [0, 1] rising from the lesion edge inward).
    """
    shape = (v.shape[0], u.shape[1])
    label = np.zeros(shape, np.uint8)
    hu = np.zeros(shape, np.float32)
    strength = np.zeros(shape, np.float32)
    z = t * LUNG_HEIGHT
    for les in sorted(lesions, key=lambda x: x.kind):
        box = _slice_box(les, z, u[0], v[:, 0])
        if box is None:
            continue
        r0, r1, c0, c1 = box
        f = _field(les, u[:, c0:c1], v[r0:r1], z)
        inside = f > 0
        if not inside.any():
            continue
        sub = (slice(r0, r1), slice(c0, c1))
        label[sub][inside] = les.kind
        hu[sub][inside] = les.hu
        strength[sub][inside] = np.clip(0.45 + f[inside] / 0.25, 0, 1)
    return label, hu, strength


def _slice_box(les: Lesion, z: float, u1: np.ndarray, v1: np.ndarray):
    reach = les.radii * (1 + 2.5 * les.roughness)
    if abs(z - les.centre[2]) > reach[2]:
        return None
    cols = np.nonzero(np.abs(u1 - les.centre[0]) < reach[0])[0]
    rows = np.nonzero(np.abs(v1 - les.centre[1]) < reach[1])[0]
    if len(cols) == 0 or len(rows) == 0:
        return None
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _field(les: Lesion, u: np.ndarray, v: np.ndarray, z: float) -> np.ndarray:
    du, dv = (u - les.centre[0]) / les.radii[0], (v - les.centre[1]) / les.radii[1]
    dz = (z - les.centre[2]) / les.radii[2]
    noise = 0.0
    for (wu, wv, wz), ph in zip(les.waves, les.phases):
        noise = noise + np.cos(wu * du + wv * dv + wz * dz + ph)
    return 1.0 - np.sqrt(du * du + dv * dv + dz * dz) + les.roughness * noise * np.sqrt(2.0 / N_WAVES)
