"""Everything in a chest slice that is not lung: body wall, bones, mediastinum, heart, upper abdomen.

Each painter takes field-of-view coordinates ``u`` ([1, W]) and ``v`` ([H, 1]), one body-axis
position ``t`` and writes Hounsfield units and a tissue code into ``hu`` / ``tissue`` ([H, W]).
"""
from __future__ import annotations

import numpy as np

from .anatomy import ChestAnatomy, body_radius, cavity_edge, diaphragm_t, ellipse_radius, heart_level, rotate, window

# Tissue codes of the ``tissue`` map returned with each slice.
TISSUE_AIR, TISSUE_FAT, TISSUE_SOFT, TISSUE_BONE, TISSUE_LUNG, TISSUE_AIRWAY = range(6)
HU_AIR, HU_SOFT, HU_BLOOD, HU_LIVER = -1000.0, 45.0, 40.0, 58.0
HU_CORTEX, HU_MARROW, HU_DISC, HU_CSF = 850.0, 360.0, 85.0, 12.0
VERTEBRA_PERIOD = 0.11  # vertebral level height, in units of t


def paint(hu, tissue, mask, value, code) -> None:
    """Write ``value`` (scalar or array) and tissue ``code`` where ``mask`` holds."""
    hu[mask] = value[mask] if isinstance(value, np.ndarray) else value
    tissue[mask] = code


def paint_body(a: ChestAnatomy, hu, tissue, u, v, t):
    """Skin/fat, muscle and the mediastinal fat of the cavity; returns the body and cavity masks."""
    r = body_radius(a, u, v, t)
    body = r < 1.0
    paint(hu, tissue, body, a.fat_hu, TISSUE_FAT)
    paint(hu, tissue, r < 1.0 - a.fat / a.body_ax, HU_SOFT, TISSUE_SOFT)
    cavity = r < cavity_edge(a)
    paint(hu, tissue, cavity, a.fat_hu + 10.0, TISSUE_FAT)
    return body, cavity, r


def paint_ribs(a: ChestAnatomy, hu, tissue, u, v, t, r) -> None:
    """Rib cross-sections: a broken ring just outside the pleura (``r``: body radius), sternum in front."""
    edge = cavity_edge(a)
    idx = np.nonzero((r > edge - 0.005) & (r < edge + 0.035))
    pu, pv = rotate(a, np.broadcast_to(u, r.shape)[idx], np.broadcast_to(v, r.shape)[idx])
    theta = np.arctan2(pv - a.body_cv, pu)
    rib = (np.cos(7 * np.abs(theta) + a.rib_phase + 55.0 * t) > 0.45) & ~((np.abs(pu) < 0.22) & (pv < a.body_cv))
    hu[idx[0][rib], idx[1][rib]] = HU_CORTEX * 0.75
    tissue[idx[0][rib], idx[1][rib]] = TISSUE_BONE
    if 0.25 < t < 0.95:
        cv = a.body_cv - a.body_ay + a.fat + 0.04
        rows, cols = window(u, v, (-0.12, 0.12, cv - 0.08, cv + 0.08))
        pu, pv = rotate(a, u[:, cols], v[rows])
        sternum = ellipse_radius(pu, pv - cv, 0.07, 0.028) < 1
        paint(hu[rows, cols], tissue[rows, cols], sternum, HU_CORTEX * 0.7, TISSUE_BONE)


def paint_spine(a: ChestAnatomy, hu, tissue, u, v, t) -> None:
    """Vertebral body (cortex and marrow, discs between levels), canal, arch and processes."""
    pu, pv = rotate(a, u, v)
    phase = (t / VERTEBRA_PERIOD + a.rib_phase) % 1.0
    disc = phase < 0.2
    rho = np.hypot(pu / 0.085, (pv - a.spine_v) / 0.075)
    paint(hu, tissue, rho < 1.0, HU_DISC if disc else HU_CORTEX, TISSUE_SOFT if disc else TISSUE_BONE)
    if not disc:
        paint(hu, tissue, rho < 0.82, HU_MARROW, TISSUE_BONE)
    canal_v = a.spine_v + 0.13
    arch = np.hypot(pu, pv - canal_v) < 0.065
    spinous = ellipse_radius(pu, pv - canal_v - 0.09, 0.025, 0.055) < 1
    transverse = ellipse_radius(np.abs(pu) - 0.1, pv - canal_v + 0.03, 0.065, 0.024) < 1
    paint(hu, tissue, arch | spinous | transverse, HU_CORTEX * 0.8, TISSUE_BONE)
    paint(hu, tissue, np.hypot(pu, pv - canal_v) < 0.04, HU_CSF, TISSUE_SOFT)


def paint_mediastinum(a: ChestAnatomy, hu, tissue, u, v, t) -> None:
    """Heart, aorta, great vessels, oesophagus and the airway tree down to the main bronchi."""
    pu, pv = rotate(a, u, v)
    paint(hu, tissue, heart_level(a, u, v, t) > 0, HU_BLOOD, TISSUE_SOFT)
    if t < 0.82:  # descending aorta, left of the spine
        paint(hu, tissue, np.hypot(pu - 0.11, pv - a.spine_v + 0.1) < 0.06, HU_BLOOD, TISSUE_SOFT)
    if 0.5 < t < 0.8:  # ascending aorta, pulmonary trunk, superior vena cava
        for cu, cv, rad in ((-0.02, -0.1, 0.075), (0.09, -0.16, 0.06), (-0.13, -0.07, 0.045)):
            paint(hu, tissue, np.hypot(pu - cu, pv - (a.body_cv + cv)) < rad, HU_BLOOD, TISSUE_SOFT)
    if 0.78 <= t < 0.86:  # aortic arch
        arch = ellipse_radius(pu - 0.04, pv - (a.body_cv + 0.05), 0.1, 0.2) < 1
        paint(hu, tissue, arch, HU_BLOOD, TISSUE_SOFT)
    paint(hu, tissue, np.hypot(pu - 0.03, pv - a.spine_v + 0.13) < 0.03, HU_SOFT, TISSUE_SOFT)
    paint_airways(a, hu, tissue, pu, pv, t)


def paint_airways(a: ChestAnatomy, hu, tissue, pu, pv, t) -> None:
    """Trachea above the carina, two main bronchi below it (walls of soft tissue)."""
    cv = a.spine_v - 0.2
    if t >= 0.62:
        centres = [(0.0, cv, 0.055)]
    elif t >= 0.48:
        off = 0.05 + 0.5 * (0.62 - t)
        centres = [(off, cv + 0.02, 0.035), (-off, cv + 0.02, 0.04)]
    else:
        return
    for cu, cvv, rad in centres:
        dist = np.hypot(pu - cu, pv - cvv)
        paint(hu, tissue, dist < rad + 0.01, HU_SOFT, TISSUE_SOFT)
        paint(hu, tissue, dist < rad, HU_AIR, TISSUE_AIRWAY)


def paint_abdomen(a: ChestAnatomy, hu, tissue, u, v, t, cavity) -> None:
    """Liver (right) and stomach/spleen (left) below the diaphragm domes, inside the cavity."""
    if t >= max(a.dome_t):
        return
    pu, _ = rotate(a, u, v)
    for side, value in ((1, HU_LIVER), (0, HU_SOFT + 5.0)):
        under = (t < diaphragm_t(a, side, u, v)) & cavity & ((pu < 0.05) if side == 1 else (pu >= 0.05))
        paint(hu, tissue, under, value, TISSUE_SOFT)


def paint_tissues(a: ChestAnatomy, u, v, t: float):
    """Every non-lung tissue of one slice.

    Returns:
        (hu float32 [H, W], tissue uint8 [H, W], body bool [H, W], cavity bool [H, W]).
    """
    shape = np.broadcast_shapes(np.shape(u), np.shape(v))
    hu = np.full(shape, HU_AIR, np.float32)
    tissue = np.zeros(shape, np.uint8)
    body, cavity, r = paint_body(a, hu, tissue, u, v, t)
    paint_abdomen(a, hu, tissue, u, v, t, cavity)
    rows, cols = window(u, v, (-0.4, 0.4, a.body_cv - a.body_ay, a.body_cv + a.body_ay))
    sub = (hu[rows, cols], tissue[rows, cols], u[:, cols], v[rows], t)
    paint_mediastinum(a, *sub)
    paint_spine(a, *sub)
    paint_ribs(a, hu, tissue, u, v, t, r)
    if t > 1.0 - 0.02:  # above the apices the cavity is neck/shoulder soft tissue
        paint(hu, tissue, cavity & (tissue == TISSUE_FAT), HU_SOFT, TISSUE_SOFT)
    return hu, tissue, body, cavity
