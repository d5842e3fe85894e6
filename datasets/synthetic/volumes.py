"""Chest volumes: a patient's slices stacked on a physical grid, with a RAS or LPS affine."""
from __future__ import annotations

import numpy as np

from .anatomy import LUNG_HEIGHT
from .chest import make_patient, render_slice

ORIENTATIONS = ("RAS", "LPS")


def check_volume_args(shape, spacing, orientation: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Validate ``shape`` (X, Y, Z), ``spacing`` (mm) and ``orientation``.

    Raises:
        ValueError: naming the bad argument and its value.
    """
    if len(shape) != 3 or min(int(s) for s in shape) < 2 or min(shape[:2]) < 16:
        raise ValueError(f"shape must be (X, Y, Z) with X, Y >= 16 and Z >= 2, got {shape!r}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing!r}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing)


def orient(stack: np.ndarray, spacing, orientation: str, z_centre_mm: float = 0.0):
    """Reorder a stack [Z, rows (anterior->posterior), cols (right->left)] into voxel order.

    Args:
        stack: array [Z, Y, X], z from inferior to superior.
        spacing: (sx, sy, sz) in mm.
        orientation: ``"LPS"`` (i toward patient left, j posterior, k superior) or ``"RAS"`` (i
            toward right, j anterior, k superior).
        z_centre_mm: world z of the volume centre.

    Returns:
        (array [X, Y, Z], affine float64 [4, 4]) with the nibabel convention voxel -> RAS+ mm.
    """
    data = np.ascontiguousarray(np.transpose(stack, (2, 1, 0)))  # [X (->L), Y (->P), Z (->S)]
    sx, sy, sz = spacing
    if orientation == "LPS":
        rot = np.diag([-sx, -sy, sz])
    else:
        data = np.ascontiguousarray(data[::-1, ::-1, :])
        rot = np.diag([sx, sy, sz])
    affine = np.eye(4)
    affine[:3, :3] = rot
    centre = (np.array(data.shape, float) - 1) / 2
    affine[:3, 3] = np.array([0.0, 0.0, z_centre_mm]) - rot @ centre
    return data, affine


def volume_heights(shape, spacing) -> np.ndarray:
    """Body-axis position ``t`` of each slice; the volume is centred on the middle of the lungs."""
    X, Y, Z = shape
    unit_mm = min(X * spacing[0], Y * spacing[1]) / 2
    z_mm = (np.arange(Z) + 0.5 - Z / 2) * spacing[2]
    return z_mm / (unit_mm * LUNG_HEIGHT) + 0.5


def make_chest_volume(*, seed: int, shape=(128, 128, 48), spacing=(0.75, 0.75, 2.5), cls: int,
                      orientation: str = "RAS", halo: bool | None = None) -> dict:
    """A chest-CT volume of the phantom patient drawn from ``seed``.

    The chest fills the in-plane field of view; the slice spacing decides how much of the lungs
    (apex to base is ``LUNG_HEIGHT`` half-fields of view) the ``Z`` slices cover, centred on the
    middle of the lungs.

    Args:
        seed: patient seed (same seed, same patient as ``make_chest_slice``).
        shape: (X, Y, Z) voxels.
        spacing: (sx, sy, sz) voxel size in mm.
        cls: 0 Control, 1 CP, 2 COVID-19.
        orientation: ``"RAS"`` or ``"LPS"`` voxel order (the affine always maps to RAS+ world).
        halo: for CP, force or forbid a ground-glass halo (None draws it).

    Returns:
        dict with ``image`` int16 [X, Y, Z] HU, ``lung`` uint8 [X, Y, Z] (0 none, 1 left,
        2 right), ``lesion`` uint8 [X, Y, Z] (0 none, 1 GGO, 2 consolidation), ``affine``
        float64 [4, 4] and ``cls`` int.

    Raises:
        ValueError: for a bad shape, spacing, orientation or class.
    """
    shape, spacing = check_volume_args(shape, spacing, orientation)
    X, Y, Z = shape
    p = make_patient(seed=seed, cls=cls, halo=halo)
    rng = np.random.default_rng([int(seed), 13])
    unit_mm = min(X * spacing[0], Y * spacing[1]) / 2
    u = ((np.arange(X) + 0.5 - X / 2) * spacing[0] / unit_mm).astype(np.float32)
    v = ((np.arange(Y) + 0.5 - Y / 2) * spacing[1] / unit_mm).astype(np.float32)
    hu = np.empty((Z, Y, X), np.float32)
    lung = np.empty((Z, Y, X), np.uint8)
    lesion = np.empty((Z, Y, X), np.uint8)
    for k, t in enumerate(volume_heights(shape, spacing)):
        out = render_slice(p, float(t), u, v, rng)
        hu[k], lung[k], lesion[k] = out["hu"], out["lung"], out["lesion"]
    z_centre = float(rng.uniform(-250.0, -100.0))
    image, affine = orient(np.clip(np.round(hu), -1024, 3071).astype(np.int16), spacing, orientation, z_centre)
    lung, _ = orient(lung, spacing, orientation, z_centre)
    lesion, _ = orient(lesion, spacing, orientation, z_centre)
    return dict(image=image, lung=lung, lesion=lesion, affine=affine, cls=p.cls)
