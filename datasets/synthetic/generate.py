"""Write the whole phantom data set: CNCB slices, COVIDx-CT slices, chest and abdomen volumes."""
from __future__ import annotations

import json
from pathlib import Path

from .montage import slice_montage, volume_montage
from .volume_writers import write_abdomen, write_volumes
from .writers import OUTPUTS, write_cls, write_seg


def _check(outputs, image_size: int, volume_shape, counts: dict, fractions) -> None:
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"outputs must be a subset of {OUTPUTS}, got unknown {unknown}")
    if int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if len(volume_shape) != 3 or min(volume_shape[:2]) < 16 or volume_shape[2] < 4:
        raise ValueError(f"volume_shape must be (X, Y, Z) with X, Y >= 16 and Z >= 4, got {volume_shape!r}")
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"volume_fractions must be three shares >= 0 summing to 1, got {tuple(fractions)}")


def generate_dataset(out_dir: str | Path, *, seed: int = 0, n_patients: int = 60, n_seg_patients: int = 80,
                     slices_per_patient: int = 8, image_size: int = 512, volume_shape=(128, 128, 40),
                     n_volumes: int = 12, volume_fractions=(0.6, 0.2, 0.2), n_abdomen: int = 4,
                     abdomen_shape=(96, 96, 48),
                     outputs=OUTPUTS, workers: int = 1, montage: bool = True) -> dict:
    """Generate the phantom data set under ``out_dir`` (layouts: see the package docstring).

    Args:
        out_dir: output folder (created).
        seed: data-set seed; the same seed writes the same files.
        n_patients: patients of the classification set (classes in turn: Control, CP, COVID-19).
        n_seg_patients: patients of the segmentation set (distinct from the classification ones).
        slices_per_patient: slices written per 2D patient.
        image_size: side of the square 2D slices, in pixels.
        volume_shape: (X, Y, Z) of chest volumes; Z is the slice count at 2.5 mm spacing (thinner
            slices give proportionally more).
        n_volumes: chest volumes (one patient each); 12 give every class in the validation split.
        volume_fractions: shares of the chest volumes in the training, validation and test splits.
        n_abdomen: abdomen volumes.
        abdomen_shape: (X, Y, Z) of abdomen volumes.
        outputs: any of ``"seg"``, ``"cls"``, ``"volumes"``, ``"abdomen"``.
        workers: processes used to render patients in parallel (the files do not depend on it).
        montage: also write ``montage.png`` (needs ``"seg"``) and ``montage_volumes.png``.

    Returns:
        Summary dict: one entry per output (root, counts, datalists), montage paths, and the
        arguments, also written to ``out_dir/summary.json``.

    Raises:
        ValueError: for an unknown output or a bad size or count.
    """
    _check(outputs, image_size, volume_shape, dict(n_patients=n_patients, n_seg_patients=n_seg_patients,
                                                     n_volumes=n_volumes, n_abdomen=n_abdomen), volume_fractions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = (int(image_size), int(image_size))
    summary: dict = dict(out_dir=str(out), seed=int(seed))
    if "seg" in outputs:
        summary["seg"] = write_seg(out, seed=seed, n_patients=n_seg_patients, n_slices=slices_per_patient,
                                   size=size, workers=workers)
    if "cls" in outputs:
        summary["cls"] = write_cls(out, seed=seed, n_patients=n_patients, n_slices=slices_per_patient,
                                   size=size, workers=workers)
    if "volumes" in outputs:
        summary["volumes"] = write_volumes(out, seed=seed, n_volumes=n_volumes, volume_shape=volume_shape,
                                           workers=workers, fractions=volume_fractions)
    if "abdomen" in outputs:
        summary["abdomen"] = write_abdomen(out, seed=seed, n_abdomen=n_abdomen, abdomen_shape=abdomen_shape,
                                           workers=workers)
    if montage:
        summary["montages"] = _montages(out, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _montages(out: Path, summary: dict) -> list[str]:
    paths = []
    if "seg" in summary and n_files(out / "seg"):
        paths.append(str(slice_montage(out, out / "montage.png")))
    if summary.get("volumes", {}).get("volumes"):
        paths.append(str(volume_montage(out / "volumes", out / "montage_volumes.png")))
    return paths


def n_files(folder: Path) -> int:
    """Number of PNG files under ``folder``."""
    return sum(1 for _ in folder.rglob("*.png"))
