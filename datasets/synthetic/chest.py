"""Chest-CT phantom: one patient's anatomy rendered as slices (2D) or volumes (3D) in HU."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from datasets.conventions import MASK_BACKGROUND, MASK_LUNG

from .anatomy import LUNG_HEIGHT, ChestAnatomy, lung_box, lung_labels_grid, sample_anatomy, window
from .lesions import LESION_CONSOLIDATION, LESION_GGO, Lesion, lesion_fields, sample_lesions
from .tissues import HU_BLOOD, TISSUE_LUNG, paint_tissues
from .vessels import VesselTree, make_vessel_tree, vessel_fraction


@dataclass(frozen=True)
class Patient:
    """Everything that stays fixed across the slices of one patient."""

    seed: int
    cls: int
    anatomy: ChestAnatomy
    vessels: VesselTree
    lesions: list[Lesion]


def make_patient(*, seed: int, cls: int, halo: bool | None = None) -> Patient:
    """Draw a patient of class ``cls`` (0 Control, 1 CP, 2 COVID-19) from ``seed``.

    Args:
        seed: patient seed; the same seed gives the same anatomy and lesions.
        cls: slice class.
        halo: for CP, force (True) or forbid (False) a ground-glass halo; None draws it.
    """
    rng = np.random.default_rng([int(seed), 7])
    anatomy = sample_anatomy(rng)
    vessels = make_vessel_tree(anatomy, rng)
    lesions = sample_lesions(anatomy, cls, rng, halo=halo)
    return Patient(seed=int(seed), cls=int(cls), anatomy=anatomy, vessels=vessels, lesions=lesions)


def smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (float32 [H, W])."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=2.5)
    radius = int(2.5 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return field * np.float32(1.0 / float((kernel ** 2).sum()) ** (len(shape) / 2))


def render_slice(p: Patient, t: float, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> dict:
    """Render one axial slice at body-axis position ``t``.

    Args:
        p: the patient.
        t: 0 at the lung bases, 1 at the apices (values outside show abdomen or neck).
        u: float [W] columns, patient right (-) to left (+); v: float [H] rows, anterior (-) to
            posterior (+); both in units of half the field of view.
        rng: noise source.

    Returns:
        dict with ``hu`` float32 [H, W], ``lung`` uint8 [H, W] (0 none, 1 left, 2 right),
        ``lesion`` uint8 [H, W] (0 none, 1 GGO, 2 consolidation), ``tissue`` uint8 [H, W] and
        ``body`` bool [H, W].
    """
    a = p.anatomy
    uu, vv = u[None, :].astype(np.float32), v[:, None].astype(np.float32)
    px = float(abs(u[1] - u[0])) if len(u) > 1 else 1.0
    hu, tissue, body, cavity = paint_tissues(a, uu, vv, t)
    lung = np.zeros(hu.shape, np.uint8)
    rows, cols = window(uu, vv, lung_box(a))
    lung[rows, cols] = lung_labels_grid(a, u[cols], v[rows], t)
    lung[~cavity] = 0
    lesion, lesion_hu, strength = lesion_fields(p.lesions, t, uu, vv)
    lesion[lung == 0] = 0
    inside = lung > 0
    hu[inside] = _lung_hu(p, t, uu, vv, px, rng, lesion, lesion_hu, strength)[inside]
    tissue[inside] = TISSUE_LUNG
    hu = ndimage.gaussian_filter(hu, a.blur / px) + a.noise_sd * smooth_noise(rng, hu.shape, 0.6)
    return dict(hu=hu.astype(np.float32), lung=lung, lesion=lesion, tissue=tissue, body=body)


def _lung_hu(p: Patient, t, uu, vv, px, rng, lesion, lesion_hu, strength) -> np.ndarray:
    """Parenchyma (gravity gradient, texture), vessels, then ground-glass and consolidation."""
    a = p.anatomy
    shape = lesion.shape
    texture = smooth_noise(rng, shape, 1.3)
    # gravity gradient (dependent lung denser), fine texture, sparse sub-resolution vessels
    parenchyma = a.lung_hu + 30.0 * (vv - a.lung_cv) / a.lung_ay + 16.0 * texture
    parenchyma = parenchyma + 260.0 * np.clip(texture - 2.4, 0, None)
    frac = vessel_fraction(p.vessels, t, shape, px)
    hu = parenchyma + frac * (HU_BLOOD - parenchyma)
    if not lesion.any():
        return hu
    ggo = parenchyma + strength * (lesion_hu + 35.0 * texture - parenchyma)
    hu = np.where(lesion == LESION_GGO, np.maximum(hu, ggo), hu)
    cons = hu + strength * (lesion_hu + 20.0 * texture - hu)
    cons = np.where(frac > 0.9, parenchyma + 60.0, cons)  # air bronchograms along the larger branches
    return np.where(lesion == LESION_CONSOLIDATION, cons, hu)


def slice_mask(lung: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """CNCB mask values: 0 background, 1 lung, 2 GGO, 3 consolidation (uint8 [H, W])."""
    mask = np.where(lung > 0, MASK_LUNG, MASK_BACKGROUND).astype(np.uint8)
    return np.where(lesion > 0, lesion + 1, mask).astype(np.uint8)


def body_box(body: np.ndarray) -> tuple[int, int, int, int]:
    """Body bounding box ``(xmin, ymin, xmax, ymax)``, max exclusive: ``img[ymin:ymax, xmin:xmax]``."""
    rows, cols = np.nonzero(body.any(1))[0], np.nonzero(body.any(0))[0]
    if len(rows) == 0:
        return 0, 0, body.shape[1], body.shape[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def grid(n: int, step: float) -> np.ndarray:
    """Centred coordinates of ``n`` samples ``step`` apart (float32 [n])."""
    return ((np.arange(n, dtype=np.float32) + 0.5 - n / 2) * step).astype(np.float32)


def lesion_heights(p: Patient) -> list[float]:
    """Body-axis positions ``t`` of the patient's lesion centres."""
    return [float(les.centre[2] / LUNG_HEIGHT) for les in p.lesions]


def make_chest_slice(*, seed: int, size: tuple[int, int] = (512, 512), cls: int, t: float | None = None,
                     halo: bool | None = None, patient: Patient | None = None) -> dict:
    """One axial chest-CT slice of the phantom patient drawn from ``seed``.

    Slices of one seed share the patient's anatomy and lesions; ``t`` picks the level.

    Args:
        seed: patient seed.
        size: (H, W) in pixels.
        cls: 0 Control, 1 CP, 2 COVID-19.
        t: body-axis position (0 lung bases, 1 apices); None picks a level through a lesion for
            CP/COVID-19 patients and a random lung level for Control.
        halo: for CP, force or forbid a ground-glass halo (None draws it).
        patient: an already drawn patient (skips drawing one from ``seed``).

    Returns:
        dict with ``image`` float32 [H, W] HU, ``mask`` uint8 [H, W] (0 bg, 1 lung, 2 GGO,
        3 consolidation), ``lung`` uint8 (0 none, 1 left, 2 right), ``lesion`` uint8 (0, 1 GGO,
        2 consolidation), ``tissue`` uint8, ``body_box`` (xmin, ymin, xmax, ymax), ``t``, ``cls``.

    Raises:
        ValueError: for a bad class or size.
    """
    H, W = _check_size(size)
    p = patient if patient is not None else make_patient(seed=seed, cls=cls, halo=halo)
    rng = np.random.default_rng([int(seed), 11, int(round((t if t is not None else -1) * 1e4)) % 2**31])
    if t is None:
        heights = lesion_heights(p)
        t = float(rng.choice(heights) + rng.normal(0, 0.02)) if heights else float(rng.uniform(0.2, 0.85))
    step = 2.0 / min(H, W)
    out = render_slice(p, t, grid(W, step), grid(H, step), rng)
    return dict(image=out["hu"], mask=slice_mask(out["lung"], out["lesion"]), lung=out["lung"],
                lesion=out["lesion"], tissue=out["tissue"], body_box=body_box(out["body"]), t=t, cls=p.cls)


def _check_size(size) -> tuple[int, int]:
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be (H, W) with both >= 16, got {size!r}")
    return int(size[0]), int(size[1])
