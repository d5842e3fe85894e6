"""Guards on the paths a script writes, checked before anything is written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def refuse_overwriting_inputs(inputs: Iterable[str | Path | None], outputs: Iterable[str | Path]) -> None:
    """Refuse outputs that would replace or change an input.

    An output collides with an input when both resolve to the same path (symlinks and ``..``
    followed), when both are the same existing file (what ``os.path.samefile`` compares: device and
    inode, so hard links count), or when the input is a folder and the output lies inside it (every
    file of a DICOM or slice folder is read as part of the scan).

    Args:
        inputs: files or folders the run reads; None entries are skipped.
        outputs: files or folders the run writes.

    Raises:
        ValueError: naming the output and the input it collides with.
    """
    resolved, identities, folders = {}, {}, {}
    for given in (Path(p) for p in inputs if p is not None):
        resolved[given.resolve()] = given
        if given.exists():
            identities[_identity(given)] = given
        if given.is_dir():
            folders[given.resolve()] = given
    for output in map(Path, outputs):
        where = output.resolve()
        source = resolved.get(where) or (identities.get(_identity(output)) if output.exists() else None)
        if source is not None:
            raise ValueError(f"output {output} is the input {source}: writing it would destroy the input; "
                             "choose another output path")
        folder = next((folders[p] for p in where.parents if p in folders), None)
        if folder is not None:
            raise ValueError(f"output {output} lies inside the input folder {folder}, whose files are read as "
                             "the input; choose an output folder outside it")


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of an existing path, the identity ``os.path.samefile`` compares."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino
