"""What every trainer shares: resume, the epoch loop of the 2D scripts, and the guards around them.

Both tracks resume through :func:`resume_training` and end each epoch through
:meth:`utils.run_dir.RunDir.end_epoch`, and each epoch's randomness is seeded from
``(seed, epoch, rank)`` (:func:`utils.reproducibility.seed_epoch`). A run killed at any point and
resumed from ``checkpoint_last.pth`` therefore ends with the same weights, on CPU, as a run that went
straight through.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

from utils.checkpoint import load_checkpoint
from utils.reproducibility import rng_state, seed_epoch, set_rng_state
from utils.run_dir import RunDir


def refuse_distributed(script: str) -> None:
    """Stop a script that does not support DDP from running as several ``torchrun`` copies.

    Raises:
        ValueError: when ``WORLD_SIZE`` > 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ValueError(f"{script} does not support several processes yet (WORLD_SIZE={world_size}): the copies "
                         f"would race on one run directory; run it as a single process")


def resume_training(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    run: RunDir | None, builder: str, kind: str, hyperparameters: dict | None = None) -> tuple[int, dict]:
    """Restore a run from its checkpoint: weights, optimizer, RNG states and the best-so-far value.

    Args:
        path: the checkpoint to resume (usually ``checkpoint_last.pth``).
        model: the freshly built model; its weights are replaced strictly.
        optimizer: the optimizer, or None.
        run: the run directory whose best-so-far value is restored (None on non-zero ranks).
        builder: the builder the checkpoint must name.
        kind: what such a checkpoint is called in errors.
        hyperparameters: optimizer settings of this command line (``lr``, ``weight_decay``); where
            they differ from the checkpoint's, they are applied and the change is printed.

    Returns:
        The first epoch to run (the checkpoint's epoch + 1) and the checkpoint.

    Raises:
        ValueError: naming the file when it is not a checkpoint of ``builder`` or its weights do not
            fit ``model``.
    """
    ckpt = load_checkpoint(path, builder=builder, kind=kind)
    load_weights(model, ckpt["model"], path)
    if optimizer is not None and ckpt["optimizer"] is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        apply_hyperparameters(optimizer, hyperparameters or {})
    if ckpt.get("rng_state"):
        set_rng_state(ckpt["rng_state"])
    if run is not None:
        run.restore_best(ckpt)
    print(f"resumed from {path}: epoch {ckpt['epoch']} done, continuing at epoch {ckpt['epoch'] + 1}")
    return ckpt["epoch"] + 1, ckpt


def load_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names the file.

    Raises:
        ValueError: when the weights do not fit the model built from the command line.
    """
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()
        raise ValueError(f"{path}: its weights do not fit the model built from these flags "
                         f"({detail[1].strip() if len(detail) > 1 else detail[0]} ...); "
                         f"use the flags the checkpoint was trained with") from None


def apply_hyperparameters(optimizer: torch.optim.Optimizer, settings: dict) -> list[str]:
    """Set the optimizer's ``lr`` / ``weight_decay`` to this command line's values.

    A resumed optimizer otherwise keeps the values of the run that saved it while ``args.json``
    records the new ones. Each change is printed, and ``metrics.jsonl`` logs the ``lr`` of every epoch.

    Returns:
        One line per changed setting.
    """
    changes = []
    for key, value in settings.items():
        if value is None:
            continue
        old = {group[key] for group in optimizer.param_groups}
        if old != {value}:
            changes.append(f"{key} changed on resume: {', '.join(f'{v:g}' for v in sorted(old))} -> {value:g}")
            for group in optimizer.param_groups:
                group[key] = value
    for line in changes:
        print(line)
    return changes


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group (what ``metrics.jsonl`` records)."""
    return float(optimizer.param_groups[0]["lr"])


def run_epochs(*, run: RunDir, epochs: range, seed: int, loader: torch.utils.data.DataLoader,
               run_epoch: Callable[[int], dict], checkpoint: Callable[[int, dict], dict],
               periodic: Callable[[int], str | None] = lambda epoch: None) -> None:
    """The epoch loop of the 2D trainers: seed the epoch, train and validate, save, then log.

    Args:
        run: the run directory (its ``best`` names the selection metric).
        epochs: the epochs to run.
        seed: the run's seed; each epoch is seeded from ``(seed, epoch)``.
        loader: the training loader; its ``generator`` is re-seeded per epoch (shuffle order).
        run_epoch: ``run_epoch(epoch) -> record``: trains one epoch and returns its metrics line.
        checkpoint: ``checkpoint(epoch, record) -> dict`` in the project's schema.
        periodic: ``periodic(epoch) -> file name`` of an extra checkpoint to keep, or None.
    """
    start = time.time()
    for epoch in epochs:
        seed_epoch(seed, epoch, generator=loader.generator)
        record = {"epoch": epoch, **run_epoch(epoch)}
        record["time_s"] = time.time() - start
        ckpt = checkpoint(epoch, record)
        ckpt["rng_state"] = rng_state()
        run.end_epoch(ckpt, record, extra_name=periodic(epoch))
    print(f"Training took {time.time() - start:.1f} s; run directory: {run.path}")
