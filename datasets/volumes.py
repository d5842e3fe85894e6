"""Clara/MSD-style ``dataset.json`` datalists as MONAI-ready dicts.

A datalist holds sections (``training``, ``validation``, ``test``, ...), each a list of entries:
``{"image", "label"}`` for segmentation (label: a path), ``{"image", "label_image", "label"}``
for classification (label: a class number, label_image: a path), or a bare image path. Paths are
relative to a data root (default: the json file's folder) and come back as absolute strings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PATH_KEYS = ("image", "label", "label_image")


def list_sections(path: str | Path) -> list[str]:
    """Names of the sections (top-level lists) of a ``dataset.json``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: naming the file when it is not a JSON object.
    """
    document = _read_json(Path(path))
    return [key for key, value in document.items() if isinstance(value, list)]


def load_datalist(path: str | Path, *, data_root: str | Path | None = None, section: str = "training",
                  check_files: bool = True) -> list[dict]:
    """Entries of one section with paths resolved.

    Args:
        path: the ``dataset.json``.
        data_root: folder that relative paths start from; default the json file's folder.
        section: which list to read.
        check_files: raise when a referenced file or folder does not exist.

    Returns:
        One dict per entry: ``image``, ``label`` and ``label_image`` paths as absolute strings
        (lists of paths element-wise); a numeric ``label`` as int (float when not integral); other
        keys unchanged.

    Raises:
        FileNotFoundError: the json, or an entry's file (naming the section, index, key and path).
        ValueError: a missing section (listing those available), an entry that is not a dict or
            path, or an entry without ``image``.
    """
    path = Path(path)
    document = _read_json(path)
    if section not in document or not isinstance(document[section], list):
        available = [k for k, v in document.items() if isinstance(v, list)]
        raise ValueError(f"{path}: no section {section!r}; available sections: {available}")
    root = Path(data_root) if data_root is not None else path.parent
    return [_entry(item, root=root, where=f"{path}: {section}[{index}]", check_files=check_files)
            for index, item in enumerate(document[section])]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object of sections, got {type(document).__name__}")
    return document


def _entry(item, *, root: Path, where: str, check_files: bool) -> dict:
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an entry must be an object or an image path, got {item!r}")
    if "image" not in item:
        raise ValueError(f"{where}: entry has no 'image' key (keys: {sorted(item)})")
    entry = dict(item)
    for key in PATH_KEYS:
        value = entry.get(key)
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            entry[key] = _resolve(value, root=root, where=f"{where} {key}", check=check_files)
        elif key == "label" and isinstance(value, (int, float)) and not isinstance(value, bool):
            entry[key] = int(value) if float(value).is_integer() else float(value)
    return entry


def _resolve(value: str | list[str], *, root: Path, where: str, check: bool) -> str | list[str]:
    if isinstance(value, list):
        return [_resolve(v, root=root, where=f"{where}[{i}]", check=check) for i, v in enumerate(value)]
    resolved = os.path.abspath(root / Path(value).expanduser())  # normalised, symlinks kept
    if check and not os.path.exists(resolved):
        raise FileNotFoundError(f"{where}: file not found: {resolved}")
    return resolved
