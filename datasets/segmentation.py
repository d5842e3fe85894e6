"""CNCB-layout lesion segmentation slices as a torchvision-style detection dataset.

Layout: ``root/imgs/<stem>.png`` and ``root/masks/<stem>.png`` (PNG or JPG), paired by file stem.
Mask values: 0 background, 1 lung, 2 GGO, 3 consolidation (``datasets.conventions``). One
instance is one connected component (8-connectivity) of the region that a ``mask_type`` maps to
one label, with at least ``min_area`` pixels.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from datasets.conventions import IMAGE_SUFFIXES, MASK_TYPE_LABELS, MASK_VALUES, class_names_for
from datasets.io import read_image, read_mask

DEFAULT_MIN_AREA = 10
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_MAX_NAMES = 10


class CNCBSegmentationDataset(Dataset):
    """Slices and lesion instances of the CNCB layout.

    Args:
        root: folder holding ``imgs_dir`` and ``masks_dir``.
        imgs_dir: sub-folder of slice images.
        masks_dir: sub-folder of mask PNGs with the images' stems.
        mask_type: ``both`` (GGO 1, consolidation 2), ``ggo`` (GGO 1) or ``merge`` (lesion 1).
        min_area: smallest instance kept, in pixels (connected components with fewer are dropped).
        transforms: optional ``transforms(image, target) -> (image, target)``, applied after the target is
            built; None (the default) gives the slice as stored. For training, pass
            ``datasets.augmentation.SliceAugmentation()``; never pass it to a validation or test set.

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: an empty folder, images without masks or masks without images (named),
            a bad ``mask_type`` or ``min_area``.
    """

    def __init__(self, root: str | Path, *, imgs_dir: str = "imgs", masks_dir: str = "masks",
                 mask_type: str = "both", min_area: int = DEFAULT_MIN_AREA,
                 transforms: Callable | None = None):
        class_names_for(mask_type)  # validates mask_type
        if min_area < 1:
            raise ValueError(f"min_area must be at least 1 pixel, got {min_area}")
        self.root = Path(root)
        self.mask_type, self.min_area, self.transforms = mask_type, int(min_area), transforms
        self.label_of_value = MASK_TYPE_LABELS[mask_type]
        images = _files_by_stem(self.root / imgs_dir)
        masks = _files_by_stem(self.root / masks_dir)
        _check_pairs(images, masks)
        self.names = sorted(images)
        self.image_paths = [images[n] for n in self.names]
        self.mask_paths = [masks[n] for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Slice ``index``.

        Returns:
            image: Float32[3, H, W] in [0, 1] (gray repeated on 3 channels).
            target: ``boxes`` Float32[N, 4] xyxy pixels (x2 = last column + 1, as COCO's box
            ``x + w``), ``labels`` Int64[N], ``masks`` UInt8[N, H, W] in {0, 1},
            ``image_id`` Int64 scalar (the index), ``area`` Float32[N] pixel counts,
            ``iscrowd`` Int64[N] zeros. A slice without lesion gives N = 0.

        Raises:
            ValueError: naming the file(s) for a corrupt image, a mask whose size differs from
            its image, or mask values outside {0, 1, 2, 3}.
        """
        gray, mask = self.load_pair(index)
        image = torch.from_numpy(gray).float().div_(255).expand(3, -1, -1).contiguous()
        target = self.target_from_mask(mask)
        target["image_id"] = torch.tensor(index, dtype=torch.int64)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The slice and its mask, both UInt8[H, W], checked for size and mask values."""
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        gray, mask = read_image(image_path), read_mask(mask_path)
        if gray.shape != mask.shape:
            raise ValueError(f"mask {mask_path} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                             f"{image_path} has {gray.shape[1]}x{gray.shape[0]}")
        bad = sorted(set(np.unique(mask).tolist()) - set(MASK_VALUES))
        if bad:
            raise ValueError(f"mask {mask_path} has values {bad} outside {list(MASK_VALUES)} "
                             "(0 background, 1 lung, 2 GGO, 3 consolidation)")
        return gray, mask

    def target_from_mask(self, mask: np.ndarray) -> dict[str, torch.Tensor]:
        """Instances of a UInt8[H, W] mask: connected components per label, ordered by label."""
        instances, labels = [], []
        for label in sorted(set(self.label_of_value.values())):
            values = [v for v, lab in self.label_of_value.items() if lab == label]
            components = _components(np.isin(mask, values), self.min_area)
            instances += components
            labels += [label] * len(components)
        return _target(instances, labels, mask.shape)

    @staticmethod
    def collate_fn(batch: list) -> tuple:
        """Batch as ``(images, targets)`` tuples, for a DataLoader."""
        return tuple(zip(*batch))


def _components(region: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Boolean [H, W] masks of the 8-connected components of ``region`` with >= min_area pixels."""
    labelled, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    areas = np.bincount(labelled.ravel(), minlength=count + 1)
    return [labelled == c for c in range(1, count + 1) if areas[c] >= min_area]


def _target(instances: list[np.ndarray], labels: list[int], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    height, width = shape
    masks = torch.from_numpy(np.stack(instances).astype(np.uint8)) if instances \
        else torch.zeros((0, height, width), dtype=torch.uint8)
    boxes = torch.tensor([_box(m) for m in instances], dtype=torch.float32).reshape(-1, 4)
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
        "area": masks.flatten(1).sum(1).float(),
        "iscrowd": torch.zeros(len(instances), dtype=torch.int64),
    }


def _box(instance: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(instance)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem; errors name the folder or the clashing files."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: empty folder, no {'/'.join(IMAGE_SUFFIXES)} image in it")
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise ValueError(f"{folder}: two files with stem {path.stem!r}: {by_stem[path.stem].name}, {path.name}")
        by_stem[path.stem] = path
    return by_stem


def _check_pairs(images: dict[str, Path], masks: dict[str, Path]) -> None:
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) without a mask: {_names(images, no_mask)}")
    if no_image:
        problems.append(f"{len(no_image)} mask(s) without an image: {_names(masks, no_image)}")
    if problems:
        raise ValueError("images and masks are paired by file stem; " + "; ".join(problems))


def _names(files: dict[str, Path], stems: list[str]) -> str:
    shown = ", ".join(str(files[s]) for s in stems[:_MAX_NAMES])
    return shown + (f" and {len(stems) - _MAX_NAMES} more" if len(stems) > _MAX_NAMES else "")
