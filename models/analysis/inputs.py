"""What the input of an analysis stands for: one scan, or a cohort of scans (a folder, a list, a datalist)."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .scan import is_dicom

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")  # files that make their folder one scan
LIST_SUFFIXES = (".txt", ".csv")
DEFAULT_SECTION = "testing"


@dataclass
class Cohort:
    """The scans an input stands for.

    Attributes:
        kind: ``scan`` (one scan, analysed as before), ``folder``, ``list`` or ``datalist``.
        paths: the scans, sorted by path.
        ids: scan id of each path (unique; the name of its output folder).
    """

    kind: str
    paths: list[Path]
    ids: dict[Path, str]

    def describe(self, source: str | os.PathLike) -> str:
        if self.kind == "scan":
            return f"input {source}: one scan"
        what = {"folder": "a folder", "list": "a list file", "datalist": "a dataset.json"}[self.kind]
        return f"input {source}: {what} of {len(self.paths)} scans"


def find_scans(source: str | os.PathLike, *, section: str = DEFAULT_SECTION,
               exclude: str | os.PathLike | None = None) -> Cohort:
    """The scans ``source`` stands for.

    A folder is a cohort when it holds NIfTI files or sub-folders (each one scan) and no DICOM or slice
    picture of its own; a folder holding such files is one scan, as is any other file than a list or a
    ``.json`` datalist.

    Args:
        source: a scan, a folder of scans, a ``.txt``/``.csv`` list (one path a line; a csv's ``path``
            column, else its first), or a MONAI ``dataset.json``; relative paths in a list or datalist
            are taken from its folder.
        section: the datalist's section (its entries are paths or dicts with ``image``).
        exclude: a folder left out of a folder cohort (the output folder, when it lies inside).

    Raises:
        FileNotFoundError: when ``source`` does not exist.
        ValueError: naming the list or datalist when it is unusable or lists nothing.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir():
        paths, kind = _folder_scans(path, exclude=exclude), "folder"
    elif path.name.lower().endswith(LIST_SUFFIXES):
        paths, kind = _listed_scans(path), "list"
    elif path.suffix.lower() == ".json":
        paths, kind = _datalist_scans(path, section), "datalist"
    else:
        paths, kind = [], "scan"
    if not paths:
        if kind not in ("scan", "folder"):
            raise ValueError(f"{path}: lists no scan")
        return Cohort("scan", [path], {path: scan_id(path)})
    paths = sorted(set(paths), key=str)
    return Cohort(kind, paths, unique_ids(paths))


def _folder_scans(folder: Path, *, exclude) -> list[Path]:
    """The NIfTI files and sub-folders of ``folder``; none when it holds slice files itself (one scan)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and (p.name.lower().endswith(SLICE_SUFFIXES) or is_dicom(p)) for p in entries):
        return []
    skip = Path(exclude).resolve() if exclude is not None else None
    return [p for p in entries if (p.is_dir() and p.resolve() != skip)
            or (p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))]


def _listed_scans(path: Path) -> list[Path]:
    """The paths of a ``.txt`` (one a line) or ``.csv`` (``path`` column, else the first) list."""
    with path.open(newline="") as handle:
        if path.suffix.lower() == ".csv":
            rows = list(csv.reader(handle))
            header = [c.strip() for c in rows[0]] if rows else []
            column = header.index("path") if "path" in header else 0
            values = [row[column] for row in rows[1:] if len(row) > column]
        else:
            values = handle.read().splitlines()
    values = [v.strip() for v in values if v.strip() and not v.strip().startswith("#")]
    return [_relative_to(path.parent, v) for v in values]


def _datalist_scans(path: Path, section: str) -> list[Path]:
    """The images of a MONAI datalist's ``section`` (entries are paths or dicts with ``image``)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON datalist ({err})") from err
    if not isinstance(data, dict) or section not in data:
        sections = sorted(data) if isinstance(data, dict) else []
        raise ValueError(f"{path}: no section {section!r} (--section); it has {sections}")
    paths = []
    for i, entry in enumerate(data[section]):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str):
            raise ValueError(f"{path}: entry {i} of {section!r} names no image path: {entry!r}")
        paths.append(_relative_to(path.parent, image))
    return paths


def _relative_to(folder: Path, value: str) -> Path:
    return Path(value) if Path(value).is_absolute() else folder / value


def scan_id(path: str | os.PathLike) -> str:
    """The scan's name: its file name without ``.nii``/``.nii.gz``, or its folder's name, in safe characters."""
    name = Path(path).name
    for suffix in (*NIFTI_SUFFIXES, *SLICE_SUFFIXES):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[:-len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "scan"


def unique_ids(paths: list[Path]) -> dict[Path, str]:
    """Scan id of each path; a repeated name gets ``-2``, ``-3``... in the order of the sorted paths (stable)."""
    ids, used = {}, set()
    for path in sorted(paths, key=str):
        base = candidate = scan_id(path)
        n = 1
        while candidate in used:
            n += 1
            candidate = f"{base}-{n}"
        ids[path] = candidate
        used.add(candidate)
    return ids
