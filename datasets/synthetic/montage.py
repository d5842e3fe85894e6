"""Montages of the written phantom data, so a person can check it at a glance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datasets.conventions import CLASS_NAMES, MASK_CONSOLIDATION, MASK_GGO, MASK_LUNG, hu_to_png, parse_slice_name

OVERLAY = {MASK_GGO: (1.0, 0.85, 0.0), MASK_CONSOLIDATION: (1.0, 0.15, 0.1)}
LUNG_COLOURS = {1: (0.2, 0.5, 1.0), 2: (0.1, 0.9, 0.4)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(gray: np.ndarray, labels: np.ndarray, colours: dict, alpha: float = 0.45) -> np.ndarray:
    """RGB float [H, W, 3] of a uint8 image with label colours blended in."""
    rgb = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, -1)
    for value, colour in colours.items():
        sel = labels == value
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.array(colour)
    return rgb


def pick_slices(seg_root: Path, per_class: int) -> dict[int, list[Path]]:
    """Up to ``per_class`` mask files per class, mixing slices with and without each lesion type."""
    masks = sorted(seg_root.glob("*/masks/*.png"))
    by_class: dict[int, list[tuple[tuple, Path]]] = {0: [], 1: [], 2: []}
    for path in masks:
        values = set(np.unique(np.asarray(Image.open(path))).tolist())
        key = (MASK_GGO in values, MASK_CONSOLIDATION in values)
        by_class[parse_slice_name(path).label].append((key, path))
    out = {}
    for cls, items in by_class.items():
        chosen, seen = [], set()
        for key, path in items:  # one of each lesion combination first
            if key not in seen:
                seen.add(key)
                chosen.append(path)
        chosen += [p for _, p in items if p not in chosen]
        out[cls] = chosen[:per_class]
    return out


def slice_montage(data_dir: str | Path, out_path: str | Path, *, per_class: int = 4) -> Path:
    """Rows Control / CP / COVID-19 of CNCB slices with GGO (yellow) and consolidation (red) overlaid."""
    plt = _pyplot()
    picks = pick_slices(Path(data_dir) / "seg", per_class)
    fig, axes = plt.subplots(3, per_class, figsize=(3 * per_class, 9.4), squeeze=False)
    for cls in range(3):
        for j in range(per_class):
            ax = axes[cls, j]
            ax.axis("off")
            if j >= len(picks[cls]):
                continue
            mask_path = picks[cls][j]
            img = np.asarray(Image.open(mask_path.parent.parent / "imgs" / mask_path.name))
            mask = np.asarray(Image.open(mask_path))
            ax.imshow(overlay(img, mask, OVERLAY))
            ax.contour(mask >= MASK_LUNG, levels=[0.5], colors=[(0.3, 0.7, 1.0)], linewidths=0.6)
            ax.set_title(f"{CLASS_NAMES[cls]}: {mask_path.stem}", fontsize=7)
    _legend(fig, plt, {"lung field": (0.3, 0.7, 1.0), "GGO (2)": OVERLAY[MASK_GGO],
                       "consolidation (3)": OVERLAY[MASK_CONSOLIDATION]})
    return _save(fig, plt, out_path, "Phantom CNCB slices (lung window, masks overlaid)")


def volume_montage(volumes_dir: str | Path, out_path: str | Path, *, n: int = 3) -> Path:
    """Axial and coronal views of the first chest volumes, lungs and lesions overlaid."""
    import nibabel as nib

    plt = _pyplot()
    images = sorted((Path(volumes_dir) / "imagesTr").glob("*.nii.gz"))[:n]
    fig, axes = plt.subplots(2, max(len(images), 1), figsize=(4 * max(len(images), 1), 8), squeeze=False)
    for j, path in enumerate(images):
        loaded = [nib.as_closest_canonical(nib.load(str(path.parent.parent / sub / path.name)))
                  for sub in ("imagesTr", "labelsTr", "lesionsTr")]
        hu, lung, lesion = (np.asarray(x.dataobj) for x in loaded)  # RAS [X, Y, Z]
        zooms = loaded[0].header.get_zooms()
        colours = {**LUNG_COLOURS, 3: OVERLAY[MASK_GGO], 4: OVERLAY[MASK_CONSOLIDATION]}
        labels = np.where(lesion > 0, lesion + 2, lung)
        k = int(np.argmax((lung > 0).sum((0, 1))))
        axial = (hu[:, :, k].T[::-1, ::-1], labels[:, :, k].T[::-1, ::-1])  # radiological view
        y = int(np.argmax((lung > 0).sum((0, 2))))
        coronal = (hu[:, y, :].T[::-1, ::-1], labels[:, y, :].T[::-1, ::-1])
        for row, (img, lab), aspect in ((0, axial, zooms[1] / zooms[0]), (1, coronal, zooms[2] / zooms[0])):
            axes[row, j].imshow(overlay(hu_to_png(img), lab, colours, 0.3), aspect=aspect)
            axes[row, j].axis("off")
        codes = nib.aff2axcodes(nib.load(str(path)).affine)
        axes[0, j].set_title(f"{path.name} {codes} {tuple(round(float(z), 2) for z in zooms)}", fontsize=7)
    _legend(fig, plt, {"left lung (1)": LUNG_COLOURS[1], "right lung (2)": LUNG_COLOURS[2],
                       "GGO": OVERLAY[MASK_GGO], "consolidation": OVERLAY[MASK_CONSOLIDATION]})
    return _save(fig, plt, out_path, "Phantom chest volumes: axial (radiological) and coronal views")


def _legend(fig, plt, entries: dict) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=name) for name, c in entries.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)


def _save(fig, plt, out_path, title: str) -> Path:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
