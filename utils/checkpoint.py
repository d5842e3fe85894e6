"""Checkpoints in the project's schema (docs/ARCHITECTURE.md), written atomically and loaded safely.

A checkpoint is a dict::

    {"model": state_dict, "optimizer": state_dict | None, "epoch": int, "args": dict,
     "builder": "models.mask_net.maskrcnn_resnet_fpn", "builder_kwargs": dict,
     "schema_version": 1, ...extra}

It holds only tensors and plain Python values so that ``torch.load(weights_only=True)`` reads it,
and it carries enough (``builder`` + ``builder_kwargs``) to rebuild the model without the command
line that trained it.
"""
from __future__ import annotations

import importlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "epoch", "args", "builder", "builder_kwargs", "schema_version")
# Builders are resolved only inside the project's own model packages.
_BUILDER_PREFIX = "models."
# Builder ids of the 2D models, part of the checkpoint schema (models.mask_net re-exports them).
SEGMENTATION_BUILDER = "models.mask_net.maskrcnn_resnet_fpn"
CLASSIFIER_BUILDER = "models.mask_net.covid_mask_net"


def make_checkpoint(
    *,
    model: torch.nn.Module | dict,
    builder: str,
    builder_kwargs: dict,
    epoch: int,
    args: dict | None = None,
    optimizer: torch.optim.Optimizer | dict | None = None,
    **extra: Any,
) -> dict:
    """Assemble a checkpoint dict in the project's schema.

    Args:
        model: the model (its ``state_dict`` is taken) or a state dict.
        builder: dotted path of the keyword-only builder, e.g. ``models.mask_net.maskrcnn_resnet_fpn``.
        builder_kwargs: keyword arguments that rebuild the model with ``builder``.
        epoch: the last completed epoch (0-based); resume continues at ``epoch + 1``.
        args: the run's arguments as a plain dict.
        optimizer: the optimizer or its state dict, or None.
        **extra: further plain values (metrics, scheduler state, ...).
    """
    if not builder.startswith(_BUILDER_PREFIX):
        raise ValueError(f"builder must be a dotted path under '{_BUILDER_PREFIX}', got {builder!r}")
    model_state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    model_state = {k: v.detach().cpu() for k, v in _unwrap_ddp(model_state).items()}
    opt_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    return {
        "model": model_state,
        "optimizer": opt_state,
        "epoch": int(epoch),
        "args": _plain(args or {}),
        "builder": builder,
        "builder_kwargs": _plain(builder_kwargs),
        "schema_version": SCHEMA_VERSION,
        **_plain(extra),
    }


TEMP_PATTERN = ".*.tmp"  # names of the temporary files save_checkpoint writes before its rename


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a temp file in the same folder, then a rename.

    A crash while writing never leaves a truncated file under ``path``; on an exception the temp file
    is removed. The file gets the permissions ``open()`` would give it (0666 less the umask), so that
    colleagues can read a shared run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete partial checkpoint writes (``.<name>.<random>.tmp``) left in ``folder`` by a killed run.

    Returns:
        The removed paths.
    """
    stale = [p for p in Path(folder).glob(TEMP_PATTERN) if p.is_file() and ".pth." in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    builder: str | tuple[str, ...] | None = None, kind: str | None = None) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its schema.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded.
        builder: the builder (or builders) the checkpoint must name, or None to accept any.
        kind: what such a checkpoint is called in the error message (e.g. "segmentation").

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file when it is empty, not a checkpoint of this project's schema, or
            built by another builder than ``builder``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the checkpoint file is empty (0 bytes); an interrupted copy or download?")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign pickles
        raise ValueError(f"{path}: cannot be read as a weights-only checkpoint of this project "
                         f"({type(err).__name__}: {_first_line(err)})") from err
    missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of this project's schema, missing keys {missing}")
    if checkpoint["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {checkpoint['schema_version']} is newer than {SCHEMA_VERSION}")
    check_builder(checkpoint, path, builder, kind)
    return checkpoint


def check_builder(checkpoint: dict, path: str | os.PathLike, builder: str | tuple[str, ...] | None,
                  kind: str | None = None) -> None:
    """Raise ValueError naming ``path`` when its builder is not ``builder`` (or one of them)."""
    wanted = (builder,) if isinstance(builder, str) else tuple(builder or ())
    if wanted and checkpoint["builder"] not in wanted:
        what = f"a {kind} checkpoint" if kind else "a checkpoint of " + " or ".join(wanted)
        task = f" (task {checkpoint['task']})" if checkpoint.get("task") else ""
        raise ValueError(f"{path}: not {what}; it was built by {checkpoint['builder']}{task}")


def _first_line(err: BaseException) -> str:
    """A short reason, without torch's advice to load with ``weights_only=False`` (which would run
    whatever code the file's pickle names)."""
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        named = f" (it names {found.group(1)})" if found else ""
        return f"it holds pickled Python objects that a safe, weights-only load refuses{named}"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(err).__name__


def resolve_builder(name: str):
    """Import the builder function named by a dotted path under ``models.``."""
    if not name.startswith(_BUILDER_PREFIX):
        raise ValueError(f"builder must be a dotted path under '{_BUILDER_PREFIX}', got {name!r}")
    module_name, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def build_model_from_checkpoint(checkpoint: dict, **overrides: Any) -> torch.nn.Module:
    """Rebuild the model of a checkpoint and load its weights strictly.

    Args:
        checkpoint: a dict from :func:`load_checkpoint`.
        **overrides: builder keyword arguments that replace the stored ones (e.g. inference
            thresholds); they must not change parameter shapes.
    """
    builder = resolve_builder(checkpoint["builder"])
    model = builder(**{**checkpoint["builder_kwargs"], **overrides})
    model.load_state_dict(checkpoint["model"], strict=True)
    return model


def _unwrap_ddp(state: dict) -> dict:
    """Drop the ``module.`` prefix that DistributedDataParallel adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _plain(value: Any) -> Any:
    """Convert to values that ``weights_only`` loading accepts (paths and tuples become str/list)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    raise TypeError(f"checkpoint values must be plain Python values or tensors, got {type(value).__name__}")
