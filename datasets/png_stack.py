"""A folder of PNG/JPG slices of one scan, stacked into a volume in (approximate) Hounsfield units.

Slice pictures carry neither Hounsfield units nor geometry, so both are assumptions the caller
states: the display ``window`` the slices were written with (grey 0 -> low HU, 255 -> high HU)
and the voxel ``spacing``. Slices are ordered by their CNCB slice number when every name follows
``[Class]_[PatientID]_[ScanNum]_[SliceNum]`` (one patient and scan only), otherwise by file name;
the first slice is the most inferior one. Pictures are in the radiological display convention
(anterior up, the patient's right on the picture's left), as the CNCB slices and the phantom are.

Numbered slices must be consecutive: slices stacked across a gap would sit one spacing apart, and
every volume in mL would be wrong, so a gap (or a repeated number) is refused.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from datasets.conventions import IMAGE_SUFFIXES, parse_slice_name
from datasets.io import Volume, read_image


def list_slices(folder: str | Path) -> list[Path]:
    """The slice files of ``folder`` in stacking order (inferior first).

    Raises:
        FileNotFoundError: when the folder does not exist or holds no PNG/JPG file.
        ValueError: when named slices belong to more than one patient or scan, or their slice
            numbers are not consecutive (naming the gap or the duplicate).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"slice folder not found: {folder}")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"{folder}: no slice pictures ({', '.join(IMAGE_SUFFIXES)})")
    try:
        names = {p: parse_slice_name(p) for p in files}
    except ValueError:
        return sorted(files, key=_natural_key)
    scans = sorted({(n.patient, n.scan) for n in names.values()})
    if len(scans) > 1:
        listed = ", ".join(f"patient {p} scan {s}" for p, s in scans[:5])
        raise ValueError(f"{folder}: slices of {len(scans)} scans in one folder ({listed}); give one scan per folder")
    files = sorted(files, key=lambda p: _natural_key(Path(names[p].slice)))
    _check_consecutive([names[p].slice for p in files], f"{folder}: patient {scans[0][0]} scan {scans[0][1]}")
    return files


def _check_consecutive(numbers: list[str], label: str) -> None:
    """Refuse slice numbers (in stacking order) with a gap or a repeat; names that are not all
    numbers are not checked."""
    if not all(n.isdigit() for n in numbers):
        return
    values = [int(n) for n in numbers]
    for low, high in zip(values, values[1:]):
        if high == low:
            raise ValueError(f"{label}: slice number {low} occurs twice")
        if high > low + 1:
            missing = f"{low + 1}" if high == low + 2 else f"{low + 1}-{high - 1}"
            raise ValueError(f"{label}: slices {low} and {high} are not adjacent, slice number(s) {missing} "
                             "missing; stacked as neighbours they would give wrong volumes")


def read_png_stack(folder: str | Path, *, window: tuple[float, float], spacing: tuple[float, float, float]
                   ) -> Volume:
    """Stack the slices of ``folder`` into a volume on a RAS grid.

    Args:
        folder: one scan's slice pictures, all the same size.
        window: (low, high) HU that grey levels 0 and 255 stand for.
        spacing: (column, row, slice) spacing in mm.

    Returns:
        Volume with Float32[X, Y, Z] HU in LPS voxel order: X along picture columns (towards the
        patient's left), Y along rows (towards posterior), Z over slices (towards superior).

    Raises:
        ValueError: naming the file whose size differs from the first slice's, or bad arguments.
    """
    low, high = (float(v) for v in window)
    if not high > low:
        raise ValueError(f"window must be (low, high) HU with high > low, got {tuple(window)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive millimetre values, got {tuple(spacing)}")
    files = list_slices(folder)
    first = read_image(files[0])
    stack = np.empty((len(files), *first.shape), np.float32)  # [Z, rows, cols]
    for z, path in enumerate(files):
        grey = first if z == 0 else read_image(path)
        if grey.shape != first.shape:
            raise ValueError(f"{path}: slice size {grey.shape} differs from {files[0].name}'s {first.shape}")
        stack[z] = low + grey.astype(np.float32) * ((high - low) / 255.0)
    array = np.ascontiguousarray(stack.transpose(2, 1, 0))  # [X cols, Y rows, Z slices]
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])  # voxel -> RAS+ mm: columns run to -x, rows to -y
    affine[:3, 3] = 0.5 * np.array([sx * (array.shape[0] - 1), sy * (array.shape[1] - 1), 0.0])
    return Volume(array=array, affine=affine, spacing=(sx, sy, sz), source=str(folder))


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
