"""The pretrained-model manifest: which checkpoint file is which model, its hash, metrics and recipe.

A models folder (``pretrained_models/`` by default) holds ``manifest.json``::

    {"schema_version": 1,
     "models": [{"name": "lung_seg", "task": "lung_seg", "builder": "models.volumetric...",
                 "builder_kwargs": {...}, "file": "lung_seg.pth", "sha256": "<hex>" | null,
                 "metrics": {...} | null, "data": "what the metrics were measured on",
                 "command": "the command that produced the checkpoint", "description": "..."}]}

and the checkpoint files it names. ``sha256`` null means the weights are not released: the entry
then only documents how to produce them. Weights are never committed.

Command line (``python -m utils.checkpoint ...`` delegates here)::

    python -m utils.checkpoint verify pretrained_models/           # like `sha256sum -c`
    python -m utils.checkpoint register pretrained_models/ --name lung_seg --ckpt runs/lung_seg/checkpoint_best.pth \\
        --metrics runs/lung_seg/test/metrics.json --data "..." --command "..."
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from utils.checkpoint import load_checkpoint

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ENTRY_KEYS = ("name", "task", "builder", "builder_kwargs", "file", "sha256", "metrics", "data", "command",
              "description")
STATUSES = ("OK", "FAILED", "MISSING", "UNRELEASED")
# Task of a 2D checkpoint, by builder (volumetric checkpoints name their task themselves).
TASK_BY_BUILDER = {"models.mask_net.maskrcnn_resnet_fpn": "segmentation_2d",
                   "models.mask_net.covid_mask_net": "classification_2d"}


class MissingModelError(FileNotFoundError):
    """A model the caller needs is not in the folder; the message says how to produce it."""


def load_manifest(folder: str | Path) -> dict:
    """Read and check ``<folder>/manifest.json``.

    Raises:
        FileNotFoundError: when the folder has no manifest.
        ValueError: naming the file and the entry for malformed JSON, a missing key or a duplicate name.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), list):
        raise ValueError(f"{path}: expected {{'schema_version': 1, 'models': [...]}}")
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest['schema_version']} is newer than {SCHEMA_VERSION}")
    names = set()
    for i, entry in enumerate(manifest["models"]):
        missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {i} ({_entry_name(entry)}) lacks keys {missing}")
        if entry["name"] in names:
            raise ValueError(f"{path}: model name {entry['name']!r} appears twice")
        names.add(entry["name"])
    return manifest


def model_entry(folder: str | Path, name: str) -> dict:
    """The manifest entry named ``name``.

    Raises:
        MissingModelError: when the manifest or the entry is absent.
    """
    try:
        models = load_manifest(folder)["models"]
    except FileNotFoundError as err:
        raise MissingModelError(f"{name}: {err}") from err
    for entry in models:
        if entry["name"] == name:
            return entry
    raise MissingModelError(f"{name}: no such entry in {Path(folder) / MANIFEST} "
                            f"(it lists {[e['name'] for e in models]})")


def resolve_model(folder: str | Path, name: str) -> Path:
    """Path of the checkpoint of model ``name``, checked against the manifest's sha256.

    Raises:
        MissingModelError: naming the model, where it was looked for and how to produce it.
        ValueError: when the file's hash differs from the manifest's.
    """
    entry = model_entry(folder, name)
    path = Path(folder) / entry["file"]
    if not path.is_file():
        raise MissingModelError(
            f"{name}: {path} does not exist. Produce it with `{entry['command']}`, then "
            f"`python -m utils.checkpoint register {folder} --name {name} --ckpt <checkpoint>`")
    if entry["sha256"] and sha256_file(path) != entry["sha256"]:
        raise ValueError(f"{name}: {path} does not match the sha256 in {Path(folder) / MANIFEST}; "
                         f"run `python -m utils.checkpoint verify {folder}`")
    return path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: str | Path) -> list[dict]:
    """Check every entry's file against its hash.

    Returns:
        One row per entry: ``name``, ``file``, ``status`` (one of :data:`STATUSES`: UNRELEASED when the
        manifest has no hash and no file is present, MISSING when a hashed file is absent).
    """
    rows = []
    for entry in load_manifest(folder)["models"]:
        path = Path(folder) / entry["file"]
        if not path.is_file():
            status = "MISSING" if entry["sha256"] else "UNRELEASED"
        else:
            status = "OK" if entry["sha256"] and sha256_file(path) == entry["sha256"] else "FAILED"
        rows.append({"name": entry["name"], "file": entry["file"], "status": status})
    return rows


def register(folder: str | Path, *, name: str, ckpt: str | Path, metrics: dict | None = None,
             data: str | None = None, command: str | None = None, description: str | None = None) -> dict:
    """Copy a checkpoint into ``folder`` as ``<name>.pth`` and add or update its manifest entry.

    Builder, builder_kwargs and task come from the checkpoint; values not given keep the existing
    entry's. The manifest is written atomically; a folder without one gets a new manifest.

    Returns:
        The entry written.
    """
    folder, ckpt = Path(folder), Path(ckpt)
    checkpoint = load_checkpoint(ckpt)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(folder) if (folder / MANIFEST).is_file() else {"schema_version": SCHEMA_VERSION, "models": []}
    old = next((e for e in manifest["models"] if e["name"] == name), {})
    target = folder / old.get("file", f"{name}.pth")
    if target.resolve() != ckpt.resolve():
        shutil.copyfile(ckpt, target)
    task = checkpoint.get("task") or TASK_BY_BUILDER.get(checkpoint["builder"]) or old.get("task", name)
    entry = {"name": name, "task": task, "builder": checkpoint["builder"],
             "builder_kwargs": checkpoint["builder_kwargs"], "file": target.name, "sha256": sha256_file(target),
             "metrics": metrics if metrics is not None else old.get("metrics"),
             "data": data if data is not None else old.get("data"),
             "command": command if command is not None else old.get("command"),
             "description": description if description is not None else old.get("description", "")}
    manifest["models"] = [entry if e["name"] == name else e for e in manifest["models"]] if old else \
        [*manifest["models"], entry]
    _write_json_atomic(folder / MANIFEST, manifest)
    return entry


def _write_json_atomic(path: Path, value: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry_name(entry) -> str:
    return repr(entry.get("name")) if isinstance(entry, dict) else "not a dict"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.checkpoint", description="Verify or register pretrained models.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the files of a models folder against manifest.json")
    v.add_argument("folder", help="folder with manifest.json (e.g. pretrained_models/)")
    v.add_argument("--strict", action="store_true", help="also fail on missing or unreleased files (default: off)")
    r = sub.add_parser("register", help="copy a checkpoint into a models folder and record it in manifest.json")
    r.add_argument("folder", help="models folder; created with a new manifest.json when missing")
    r.add_argument("--name", required=True, help="model name, e.g. lung_seg (required)")
    r.add_argument("--ckpt", required=True, help="checkpoint in the project's schema (required)")
    r.add_argument("--metrics", default=None, help="JSON file of metrics to record (default: keep the entry's)")
    r.add_argument("--data", default=None, help="what the metrics were measured on (default: keep the entry's)")
    r.add_argument("--command", dest="recipe", default=None,
                   help="the command that produced the checkpoint (default: keep the entry's)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (1 when a file FAILED, or with --strict any not OK)."""
    args = get_args_parser().parse_args(argv)
    if args.command == "register":
        metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
        entry = register(args.folder, name=args.name, ckpt=args.ckpt, metrics=metrics, data=args.data,
                         command=args.recipe)
        print(f"{entry['file']}: registered in {Path(args.folder) / MANIFEST} (sha256 {entry['sha256'][:12]})")
        return 0
    rows = verify(args.folder)
    for row in rows:
        print(f"{row['file']}: {row['status']}")
    bad = [r for r in rows if r["status"] == "FAILED" or (args.strict and r["status"] != "OK")]
    if bad:
        print(f"WARNING: {len(bad)} of {len(rows)} files did not verify", file=sys.stderr)
    return 1 if bad else 0
