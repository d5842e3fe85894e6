"""Slice classification (Control / CP / COVID-19) from file names or a COVIDx-CT split file.

File names follow ``[Class]_[PatientID]_[ScanNum]_[SliceNum].png`` with Class 0/1/2 or
Normal/CP/NCP (``datasets.conventions.parse_slice_name``); patient, scan and slice come from the
name so results can be aggregated per patient or scan. A COVIDx-CT split file has one line per
slice, ``<filename> <class> <xmin> <ymin> <xmax> <ymax>``, with a body box in pixels (xmax and
ymax exclusive, as ``image[ymin:ymax, xmin:xmax]``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.conventions import CLASS_NAMES, IMAGE_SUFFIXES, parse_slice_name
from datasets.io import read_image

SPLIT_FIELDS = ("filename", "class", "xmin", "ymin", "xmax", "ymax")


class SliceClassificationDataset(Dataset):
    """CT slices with a class label each.

    Args:
        root: folder of slice images.
        split_file: COVIDx-CT split file; when None, every image in ``root`` is used with the
            class from its name.
        crop_to_box: crop each slice to its split-file box (needs ``split_file``).
        transforms: optional callable on the image tensor Float32[3, H, W].
        image_size: resize to this (size or (height, width)) after cropping; None keeps the size.

    Raises:
        FileNotFoundError: ``root``, the split file, or a listed image is missing.
        ValueError: an empty folder, a name breaking the convention (named), a malformed split-file
            line (file, line number and problem), ``crop_to_box`` without a split file.
    """

    def __init__(self, root: str | Path, *, split_file: str | Path | None = None, crop_to_box: bool = False,
                 transforms: Callable | None = None, image_size: int | tuple[int, int] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder not found: {self.root}")
        if crop_to_box and split_file is None:
            raise ValueError("crop_to_box needs a split_file with the body boxes")
        self.crop_to_box, self.transforms = crop_to_box, transforms
        self.image_size = _check_size(image_size)
        self.records = (read_split_file(split_file, self.root) if split_file is not None
                        else _records_from_names(self.root))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, dict]:
        """Slice ``index``.

        Returns:
            image Float32[3, H, W] in [0, 1], the class (0 Control, 1 CP, 2 COVID-19), and
            ``{"file", "patient", "scan", "slice"}``.

        Raises:
            ValueError: naming the file when it is corrupt or its box falls outside the image.
        """
        record = self.records[index]
        image = torch.from_numpy(read_image(record["file"])).float().div_(255)
        if self.crop_to_box:
            image = _crop(image, record)
        image = image.expand(3, -1, -1)
        if self.image_size is not None:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp_(0, 1)
        image = image.contiguous()
        if self.transforms is not None:
            image = self.transforms(image)
        meta = {k: record[k] for k in ("file", "patient", "scan", "slice")}
        return image, record["label"], meta

    @property
    def labels(self) -> list[int]:
        """Class of every slice, in order."""
        return [r["label"] for r in self.records]

    @staticmethod
    def collate_fn(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Batch as ``(Float32[B, 3, H, W], Int64[B], metas)``; images must share one size."""
        images, labels, metas = zip(*batch)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(metas)


def read_split_file(path: str | Path, root: str | Path) -> list[dict]:
    """Records of a COVIDx-CT split file; blank lines and ``#`` comments are skipped.

    Returns:
        One dict per line: ``file`` (absolute path), ``label``, ``patient``, ``scan``, ``slice``,
        ``box`` (xmin, ymin, xmax, ymax).

    Raises:
        FileNotFoundError: the split file or a listed image is missing.
        ValueError: naming the split file and line for a malformed line, a name breaking the
            convention, a class that contradicts the name, or a file listed twice; or an empty file.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    records, seen = [], {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        record = _parse_split_line(line, f"{path}, line {number}", root)
        if record["file"] in seen:
            raise ValueError(f"{path}, line {number}: {Path(record['file']).name} is already listed on line "
                             f"{seen[record['file']]}")
        seen[record["file"]] = number
        records.append(record)
    if not records:
        raise ValueError(f"{path}: empty split file, expected lines '{' '.join(f'<{f}>' for f in SPLIT_FIELDS)}'")
    return records


def _parse_split_line(line: str, where: str, root: Path) -> dict:
    fields = line.split()
    if len(fields) != len(SPLIT_FIELDS):
        raise ValueError(f"{where}: expected {len(SPLIT_FIELDS)} fields "
                         f"'{' '.join(f'<{f}>' for f in SPLIT_FIELDS)}', got {len(fields)}: {line.strip()!r}")
    name = fields[0]
    try:
        label, *box = (int(v) for v in fields[1:])
    except ValueError:
        raise ValueError(f"{where}: class and box must be integers, got {' '.join(fields[1:])!r}") from None
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"{where}: class must be 0, 1 or 2 ({', '.join(CLASS_NAMES)}), got {label}")
    if box[0] < 0 or box[1] < 0 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{where}: box must have 0 <= xmin < xmax and 0 <= ymin < ymax, got {box}")
    record = _record(root / name, where=where)
    if record["label"] != label:
        raise ValueError(f"{where}: class {label} contradicts the file name {name} "
                         f"(class {record['label']}, {CLASS_NAMES[record['label']]})")
    if not Path(record["file"]).is_file():
        raise FileNotFoundError(f"{where}: listed image not found: {record['file']}")
    return {**record, "box": tuple(box)}


def _records_from_names(root: Path) -> list[dict]:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: empty folder, no {'/'.join(IMAGE_SUFFIXES)} image in it")
    return [_record(p, where=str(p)) for p in files]


def _record(path: Path, *, where: str) -> dict:
    try:
        name = parse_slice_name(path)
    except ValueError as err:
        if where == str(path):
            raise
        raise ValueError(f"{where}: {err}") from err
    return {"file": str(path.resolve()), "label": name.label, "patient": name.patient, "scan": name.scan,
            "slice": name.slice, "box": None}


def _crop(image: torch.Tensor, record: dict) -> torch.Tensor:
    xmin, ymin, xmax, ymax = record["box"]
    height, width = image.shape
    if xmax > width or ymax > height:
        raise ValueError(f"{record['file']}: box {record['box']} falls outside the {width}x{height} (WxH) image")
    return image[ymin:ymax, xmin:xmax]


def _check_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {size}")
    return size
