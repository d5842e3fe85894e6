"""The pretrained-model manifest: which checkpoint file is which model, its hash, metrics and recipe.

A models folder (``pretrained_models/`` by default) holds ``manifest.json``::

    {"schema_version": 1,
     "models": [{"name": "lung_seg", "task": "lung_seg", "builder": "models.volumetric...",
                 "builder_kwargs": {...}, "file": "lung_seg.pth", "sha256": "<hex>" | null,
                 "metrics": {...} | null, "data": "what the metrics were measured on",
                 "command": "the command that produced the checkpoint", "description": "..."}]}

and the checkpoint files it names. ``sha256`` null means the weights are not released: the entry
then only documents how to produce them. Weights are never committed.

Command line::

    python -m utils.manifest verify pretrained_models/           # like `sha256sum -c`
    python -m utils.manifest register pretrained_models/ --name lung_seg --ckpt runs/lung_seg/checkpoint_best.pth \\
        --metrics runs/lung_seg/test/metrics.json --data "..." --command "..."

Statuses of ``verify``: OK (hash matches), FAILED (hash differs), MISSING (hashed file absent),
UNRELEASED (the manifest records no hash: nothing to check against, whether or not a file is there).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from utils.checkpoint import CLASSIFIER_BUILDER, SEGMENTATION_BUILDER, load_checkpoint

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ENTRY_KEYS = ("name", "task", "builder", "builder_kwargs", "file", "sha256", "metrics", "data", "command",
              "description")
STATUSES = ("OK", "FAILED", "MISSING", "UNRELEASED")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Task of a 2D checkpoint, by builder (volumetric checkpoints name their task themselves).
TASK_BY_BUILDER = {SEGMENTATION_BUILDER: "segmentation_2d", CLASSIFIER_BUILDER: "classification_2d"}


class MissingModelError(FileNotFoundError):
    """A model the caller needs is not in the folder; the message says how to produce it."""


def load_manifest(folder: str | Path) -> dict:
    """Read and check ``<folder>/manifest.json``.

    Returns:
        ``{"schema_version": 1, "models": [entry, ...]}`` with every entry's keys and types checked.

    Raises:
        FileNotFoundError: when the folder has no manifest.
        ValueError: naming the file and the entry for malformed JSON, a missing key, a value of the wrong
            type, a file outside the folder or a duplicate name.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder} (looked for {path})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), list):
        raise ValueError(f"{path}: expected {{'schema_version': 1, 'models': [...]}}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version must be an integer 1..{SCHEMA_VERSION}, got {version!r}")
    names = set()
    for i, entry in enumerate(manifest["models"]):
        _check_entry(entry, where=f"{path}: entry {i} ({_entry_name(entry)})")
        if entry["name"] in names:
            raise ValueError(f"{path}: model name {entry['name']!r} appears twice")
        names.add(entry["name"])
    return manifest


def _check_entry(entry, *, where: str) -> None:
    """Raise ValueError (prefixed with ``where``) unless ``entry`` has every key with a value of the right type."""
    missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise ValueError(f"{where} lacks keys {missing}")
    problems = [f"{k} must be a non-empty string" for k in ("name", "task", "builder", "file")
                if not isinstance(entry[k], str) or not entry[k]]
    problems += [f"{k} must be a string or null" for k in ("data", "command", "description")
                 if entry[k] is not None and not isinstance(entry[k], str)]
    if not isinstance(entry["builder_kwargs"], dict):
        problems.append("builder_kwargs must be an object")
    if entry["metrics"] is not None and not isinstance(entry["metrics"], dict):
        problems.append("metrics must be an object or null")
    if entry["sha256"] is not None and not (isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
        problems.append(f"sha256 must be 64 lowercase hex digits or null, got {entry['sha256']!r}")
    if isinstance(entry["file"], str) and (Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts):
        problems.append(f"file must be a path inside the manifest's folder, got {entry['file']!r}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")


def model_entry(folder: str | Path, name: str) -> dict:
    """The manifest entry named ``name``.

    Raises:
        MissingModelError: when the manifest or the entry is absent; the message says how to add it.
        ValueError: when the manifest is malformed.
    """
    try:
        models = load_manifest(folder)["models"]
    except FileNotFoundError as err:
        raise MissingModelError(f"{name}: {err}. Train the model (pretrained_models/README.md gives each "
                                f"model's command), then {_register_hint(folder, name)}") from err
    for entry in models:
        if entry["name"] == name:
            return entry
    raise MissingModelError(f"{name}: no such entry in {Path(folder) / MANIFEST} (it lists "
                            f"{[e['name'] for e in models]}). Train the model, then {_register_hint(folder, name)}")


def resolve_model(folder: str | Path, name: str) -> Path:
    """Path of the checkpoint of model ``name``, checked against the manifest's sha256 when it has one.

    Raises:
        MissingModelError: naming the model, where it was looked for and how to produce it.
        ValueError: when the file's hash differs from the manifest's.
    """
    entry = model_entry(folder, name)
    path = Path(folder) / entry["file"]
    if not path.is_file():
        recipe = f"Produce it with `{entry['command']}`, then" if entry["command"] else "Train it, then"
        raise MissingModelError(f"{name}: {path} does not exist. {recipe} {_register_hint(folder, name)}")
    if entry["sha256"] and sha256_file(path) != entry["sha256"]:
        raise ValueError(f"{name}: {path} does not match the sha256 in {Path(folder) / MANIFEST}; "
                         f"run `python -m utils.manifest verify {folder}`")
    return path


def _register_hint(folder: str | Path, name: str) -> str:
    return f"`python -m utils.manifest register {folder} --name {name} --ckpt <checkpoint>`"


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
        One row per entry, in manifest order: ``name``, ``file``, ``status`` (one of :data:`STATUSES`:
        UNRELEASED when the manifest has no hash, MISSING when a hashed file is absent).
    """
    rows = []
    for entry in load_manifest(folder)["models"]:
        path = Path(folder) / entry["file"]
        if not entry["sha256"]:
            status = "UNRELEASED"
        elif not path.is_file():
            status = "MISSING"
        else:
            status = "OK" if sha256_file(path) == entry["sha256"] else "FAILED"
        rows.append({"name": entry["name"], "file": entry["file"], "status": status})
    return rows


def register(folder: str | Path, *, name: str, ckpt: str | Path, metrics: dict | None = None,
             data: str | None = None, command: str | None = None, copy: bool = True,
             description: str | None = None) -> dict:
    """Put a checkpoint into ``folder`` as the entry's file and add or update its manifest entry.

    Builder, builder_kwargs and task come from the checkpoint (volumetric checkpoints carry ``task``;
    2D ones get theirs from the builder); metrics, data, command and description not given keep the
    existing entry's. The file is placed and the manifest written atomically; a folder without a
    manifest gets a new one.

    Args:
        folder: the models folder (created when missing).
        name: model name; a new entry's file is ``<name>.pth``.
        ckpt: checkpoint in the project's schema (utils.checkpoint).
        metrics: metrics to record, or None to keep the entry's.
        data: what the metrics were measured on, or None to keep the entry's.
        command: the command that produced the checkpoint, or None to keep the entry's.
        copy: copy the file (True) or hard-link it (False; copies when the folders lie on different
            file systems).
        description: free text, or None to keep the entry's.

    Returns:
        The entry written.

    Raises:
        FileNotFoundError, ValueError: for a missing or foreign checkpoint (naming it), a bad name,
            malformed metrics, or a checkpoint whose task differs from the existing entry's.
    """
    folder, ckpt = Path(folder), Path(ckpt)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"model name must be letters, digits, '_', '-' or '.', got {name!r}")
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f"{name}: metrics must be a dict, got {type(metrics).__name__}")
    checkpoint = load_checkpoint(ckpt)
    empty = {"schema_version": SCHEMA_VERSION, "models": []}
    manifest = load_manifest(folder) if (folder / MANIFEST).is_file() else empty
    old = next((e for e in manifest["models"] if e["name"] == name), {})
    task = checkpoint.get("task") or TASK_BY_BUILDER.get(checkpoint["builder"]) or old.get("task", name)
    if old and old["task"] != task:
        raise ValueError(f"{ckpt}: a {task!r} checkpoint cannot be registered as {name!r}, whose task in "
                         f"{folder / MANIFEST} is {old['task']!r}")
    target = folder / old.get("file", f"{name}.pth")
    _place_file(ckpt, target, copy=copy)
    given = {"metrics": metrics, "data": data, "command": command, "description": description}
    entry = {"name": name, "task": task, "builder": checkpoint["builder"],
             "builder_kwargs": checkpoint["builder_kwargs"], "file": old.get("file", target.name),
             "sha256": sha256_file(target),
             **{k: v if v is not None else old.get(k, "" if k == "description" else None) for k, v in given.items()}}
    manifest["models"] = ([entry if e["name"] == name else e for e in manifest["models"]] if old
                          else [*manifest["models"], entry])
    _write_json_atomic(folder / MANIFEST, manifest)
    return entry


def _place_file(source: Path, target: Path, *, copy: bool) -> None:
    """Copy or hard-link ``source`` to ``target`` through a temp name in the target's folder, then rename."""
    if target.exists() and target.resolve() == source.resolve():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        if copy:
            shutil.copyfile(source, tmp)
        else:
            _link_or_copy(source, Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(source: Path, tmp: Path) -> None:
    tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        print(f"cannot hard-link {source} into {tmp.parent} ({err.strerror}); copying it", file=sys.stderr)
        shutil.copyfile(source, tmp)


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
    return repr(entry.get("name")) if isinstance(entry, dict) else "not an object"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.manifest", description="Verify or register pretrained models.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the files of a models folder against manifest.json")
    v.add_argument("folder", help="folder with manifest.json, e.g. pretrained_models/ (required)")
    v.add_argument("--strict", action="store_true", help="also fail on missing or unreleased files (default: off)")
    r = sub.add_parser("register", help="copy a checkpoint into a models folder and record it in manifest.json")
    r.add_argument("folder", help="models folder; created with a new manifest.json when missing (required)")
    r.add_argument("--name", required=True, help="model name, e.g. lung_seg (required)")
    r.add_argument("--ckpt", required=True, help="checkpoint in the project's schema (required)")
    r.add_argument("--metrics", default=None, help="JSON file of metrics to record (default: keep the entry's)")
    r.add_argument("--data", default=None, help="what the metrics were measured on (default: keep the entry's)")
    r.add_argument("--command", dest="recipe", metavar="TEXT", default=None,
                   help="the command that produced the checkpoint (default: keep the entry's)")
    r.add_argument("--description", default=None, help="free text about the model (default: keep the entry's)")
    r.add_argument("--link", action="store_true",
                   help="hard-link the checkpoint instead of copying it (default: off, copy)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (1 when a file FAILED, or with --strict any not OK;
    2 for a missing or malformed manifest, checkpoint or metrics file)."""
    args = get_args_parser().parse_args(argv)
    try:
        return _register_cli(args) if args.command == "register" else _verify_cli(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _register_cli(args: argparse.Namespace) -> int:
    entry = register(args.folder, name=args.name, ckpt=args.ckpt, metrics=_read_metrics(args.metrics),
                     data=args.data, command=args.recipe, copy=not args.link, description=args.description)
    print(f"{entry['file']}: registered in {Path(args.folder) / MANIFEST} (sha256 {entry['sha256'][:12]})")
    return 0


def _read_metrics(path: str | None) -> dict | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--metrics {path} does not exist")
    try:
        metrics = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--metrics {path}: not valid JSON ({err})") from err
    if not isinstance(metrics, dict):
        raise ValueError(f"--metrics {path}: expected a JSON object, got {type(metrics).__name__}")
    return metrics


def _verify_cli(args: argparse.Namespace) -> int:
    rows = verify(args.folder)
    for row in rows:
        print(f"{row['file']}: {row['status']}")
        if row["status"] == "UNRELEASED" and (Path(args.folder) / row["file"]).is_file():
            print(f"note: {row['file']} is present but has no sha256 in the manifest; register it",
                  file=sys.stderr)
    bad = [r for r in rows if r["status"] == "FAILED" or (args.strict and r["status"] != "OK")]
    if bad:
        print(f"WARNING: {len(bad)} of {len(rows)} files did not verify", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
