"""What every trainer shares: resume, the optimizer step, the epoch loop of the 2D pipelines, and the guards.

Both tracks resume through :func:`resume_training`, step through :func:`backward_step` and end each
epoch through :meth:`utils.run_dir.RunDir.end_epoch` (checkpoints first, then the metrics line, and
the best-so-far value). The 2D pipelines open, resume and run their epochs through :func:`fit`,
configured by a :class:`RunConfig`. Each epoch's randomness is seeded from
``(seed, epoch, rank)`` (:func:`utils.reproducibility.seed_epoch`). A run killed at any point and
resumed from ``checkpoint_last.pth`` therefore ends with the same weights, on CPU, as a run that went
straight through.

Under ``torchrun`` the 2D trainers run DDP (:mod:`utils.distributed`): :func:`start_training` joins the
process group, every process trains on its DistributedSampler share, and rank 0 alone checks and
writes the run directory and validates while the others wait at a barrier.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from utils.amp import checkpoint_entries as amp_entries
from utils.amp import precision, restore_scaler
from utils.checkpoint import load_checkpoint, make_checkpoint
from utils.cli import args_to_dict, resolve_device
from utils.distributed import (
    DistContext,
    barrier,
    cleanup_distributed,
    on_main,
    set_sampler_epoch,
    setup_distributed,
)
from utils.reproducibility import rng_state, seed_epoch, seed_everything, set_rng_state
from utils.run_dir import Best, RunDir, check_run_dir


@dataclass(kw_only=True)
class RunConfig:
    """Settings every 2D training run has (the flags of ``utils.cli``'s run, epoch and optimisation groups).

    Attributes:
        save_dir: the run directory.
        resume: checkpoint to resume from, or None.
        overwrite: start a new run in a used ``save_dir``, moving its files aside.
        num_epochs: the run ends after this many epochs in total, counted from ``start_epoch``; a
            resumed run continues to that same end.
        start_epoch: number of the first epoch of a new run.
        save_every: also keep ``<model_name>_ckpt_<epoch>.pth`` every this many epochs.
        model_name: prefix of those periodic checkpoints.
        batch_size: slices per optimizer step and process; under torchrun the step sees
            ``batch_size * world_size`` slices.
        lrate, weight_decay, num_workers: optimizer and loader settings.
        optimizer: "adam" (the original's) or "sgd" (momentum 0.9).
        lr_schedule: "constant" (the original's), "cosine" (to zero at the last epoch) or "step"
            (x0.1 at 75 % and again at 90 % of the steps); see :func:`lr_factor`.
        warmup_steps: the learning rate rises linearly from 0.1 % of ``lrate`` over these first steps.
        max_steps: batches per epoch (smoke runs), or None for all.
        no_progress: hide progress bars.
        device: cpu, cuda or cuda:N.
        amp: mixed precision in training (:mod:`utils.amp`: bfloat16, or float16 with loss scaling on
            GPUs without bfloat16).
        seed: the run's seed.
        sync_bn: under torchrun on GPUs, synchronise the statistics of the BatchNorm layers that train
            on batch statistics across the processes (:func:`utils.distributed.sync_batchnorm`); off,
            each process normalises with its own batch's, as the original did on each GPU.
    """

    save_dir: str
    resume: str | None = None
    overwrite: bool = False
    num_epochs: int = 50
    start_epoch: int = 0
    save_every: int = 10
    model_name: str
    batch_size: int
    lrate: float = 1e-5
    weight_decay: float = 1e-3
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    num_workers: int = 0
    max_steps: int | None = None
    no_progress: bool = False
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    sync_bn: bool = False


@contextlib.contextmanager
def start_training(config: RunConfig) -> Iterator[DistContext]:
    """The guards before any work, in this process's place in the process group; then seed everything.

    Joins the process group that ``torchrun`` describes (:func:`utils.distributed.setup_distributed`;
    under it ``cuda`` becomes ``cuda:LOCAL_RANK``), has rank 0 alone check the run directory (the
    others raise its error too) and leaves the group at the end of the block.

    Yields:
        This process's :class:`utils.distributed.DistContext`.

    Raises:
        ValueError: for an unusable device.
        FileExistsError: for a new run in a used ``save_dir`` without ``overwrite``.
    """
    ctx = setup_distributed(resolve_device(config.device))
    try:
        on_main(ctx, lambda: check_run_dir(config.save_dir, resume=bool(config.resume), overwrite=config.overwrite))
        seed_everything(config.seed)
        yield ctx
    except BaseException:
        cleanup_distributed(ctx, wait=False)  # the other processes may never reach a barrier
        raise
    cleanup_distributed(ctx)


OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step")


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9, over the parameters of ``model`` that require gradients, at
    ``config``'s lr and weight decay.

    Raises:
        ValueError: for an unknown optimizer.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lrate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lrate, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The multiple of the base learning rate at optimizer step ``step`` (counted from 0) of ``total``.

    The factor depends on the step alone, so a resumed run follows the same schedule with nothing
    stored: ``constant`` 1; ``cosine`` ``0.5 * (1 + cos(pi * step / total))``; ``step`` 1, then 0.1
    from 75 % and 0.01 from 90 % of ``total``. Over the first ``warmup`` steps it is multiplied by a
    linear ramp from 0.001 to 1.

    Raises:
        ValueError: for an unknown schedule.
    """
    if schedule == "constant":
        factor = 1.0
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    elif schedule == "step":
        factor = 1.0 if step < 0.75 * total else 0.1 if step < 0.9 * total else 0.01
    else:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup:
        factor *= 0.001 + 0.999 * step / warmup
    return factor


def steps_per_epoch(loader: torch.utils.data.DataLoader, max_steps: int | None) -> int:
    """Optimizer steps in one epoch over ``loader`` (at most ``max_steps``)."""
    return min(len(loader), max_steps) if max_steps else len(loader)


def lr_setter(config: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
              ) -> Callable[[int], Callable[[int], None]] | None:
    """``for_epoch(epoch) -> set_lr(step)``: sets the optimizer's lr before each step of ``config``'s
    schedule (:func:`lr_factor` over all of the run's epochs); None for a constant lr without warm-up."""
    if config.lr_schedule == "constant" and not config.warmup_steps:
        return None
    total = (config.start_epoch + config.num_epochs) * steps_per_epoch

    def for_epoch(epoch: int) -> Callable[[int], None]:
        def set_lr(step: int) -> None:
            value = config.lrate * lr_factor(config.lr_schedule, epoch * steps_per_epoch + step, total,
                                             config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = value
        return set_lr
    return for_epoch


def fit(config: RunConfig, *, ctx: DistContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        train_loader: torch.utils.data.DataLoader, builder: str, builder_kwargs: dict, kind: str,
        run_epoch: Callable[[int], dict], checkpoint_extras: Callable[[dict], dict],
        best: Best | None = None, scaler: torch.amp.GradScaler | None = None) -> RunDir | None:
    """Open the run directory, resume when asked, and run the epochs up to ``start_epoch + num_epochs``.

    Under torchrun rank 0 alone opens the run directory (moving an old run aside with ``overwrite``)
    and writes to it; every process resumes the weights, optimizer and loss scale, and rank 0 also the
    best-so-far value.

    Args:
        config: the run's settings; ``asdict(config)`` goes to args.json and into every checkpoint.
        ctx: this process (:func:`start_training`).
        model: the unwrapped model on its device; its weights (and the optimizer's state) are replaced on
            resume, and the checkpoints hold its ``state_dict`` (no DDP ``module.`` prefix).
        optimizer: the optimizer.
        train_loader: the shuffled training loader (re-seeded each epoch; its DistributedSampler under DDP).
        builder, builder_kwargs: what the checkpoints record (and a resumed one must name).
        kind: what such a checkpoint is called in errors ("segmentation", "classification").
        run_epoch: ``run_epoch(epoch) -> record``: trains and validates one epoch, returns its metrics.
        checkpoint_extras: ``checkpoint_extras(record) -> dict`` of further checkpoint entries.
        best: the metric that selects ``checkpoint_best.pth`` (default: lowest ``val_loss``).
        scaler: the GradScaler of float16 training, saved in every checkpoint and restored on resume;
            every checkpoint also records the precision ``config.amp`` resolved to on ``config.device``.

    Returns:
        The run directory on rank 0, None on the other ranks.
    """
    args = args_to_dict(asdict(config))
    run = on_main(ctx, lambda: RunDir(config.save_dir, args=args, seed=config.seed, resume=bool(config.resume),
                                      overwrite=config.overwrite, best=best))
    first_epoch = config.start_epoch
    trained_in = precision(resolve_device(config.device), config.amp)
    if config.resume:
        scheduled = config.lr_schedule != "constant" or config.warmup_steps  # its lr is set before every step
        first_epoch, _ = resume_training(config.resume, model=model, optimizer=optimizer, run=run,
                                         builder=builder, kind=kind, scaler=scaler,
                                         hyperparameters={"lr": None if scheduled else config.lrate,
                                                          "weight_decay": config.weight_decay})

    def checkpoint(epoch: int, record: dict) -> dict:
        return make_checkpoint(model=model, optimizer=optimizer, epoch=epoch, args=args, builder=builder,
                               builder_kwargs=builder_kwargs, **amp_entries(scaler, trained_in),
                               **checkpoint_extras(record))

    run_epochs(run=run, epochs=range(first_epoch, config.start_epoch + config.num_epochs), seed=config.seed,
               ctx=ctx, loader=train_loader, run_epoch=run_epoch, checkpoint=checkpoint,
               periodic=lambda e: f"{config.model_name}_ckpt_{e + 1}.pth" if (e + 1) % config.save_every == 0 else None)
    return run


def resume_training(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    run: RunDir | None, builder: str, kind: str,
                    hyperparameters: dict | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict]:
    """Restore a run from its checkpoint: weights, optimizer, loss scale, RNG states and the best-so-far value.

    Args:
        path: the checkpoint to resume (usually ``checkpoint_last.pth``).
        model: the freshly built model; its weights are replaced strictly.
        optimizer: the optimizer, or None.
        run: the run directory whose best-so-far value is restored (None on non-zero ranks).
        builder: the builder the checkpoint must name.
        kind: what such a checkpoint is called in errors.
        hyperparameters: optimizer settings of this command line (``lr``, ``weight_decay``); where
            they differ from the checkpoint's, they are applied and the change is printed.
        scaler: the GradScaler of float16 training, or None (:func:`utils.amp.restore_scaler`).

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
    restore_scaler(scaler, ckpt, path)
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


def backward_step(total: torch.Tensor, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None) -> None:
    """Backward pass and optimizer step, through ``scaler`` when mixed precision is on."""
    if scaler is None:
        total.backward()
        optimizer.step()
        return
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group (what ``metrics.jsonl`` records)."""
    return float(optimizer.param_groups[0]["lr"])


def run_epochs(*, run: RunDir | None, epochs: range, seed: int, loader: torch.utils.data.DataLoader,
               run_epoch: Callable[[int], dict], checkpoint: Callable[[int, dict], dict],
               periodic: Callable[[int], str | None] = lambda epoch: None,
               ctx: DistContext | None = None) -> None:
    """The epoch loop of the 2D trainers: seed the epoch, train and validate, save, then log (``run.end_epoch``).

    Args:
        run: the run directory (its ``best`` names the selection metric); None on non-zero ranks, which
            neither save nor log and wait at a barrier while rank 0 does.
        epochs: the epochs to run.
        seed: the run's seed; each epoch is seeded from ``(seed, epoch, rank)``.
        loader: the training loader; its ``generator`` is re-seeded per epoch (shuffle order, worker
            seeds) and its DistributedSampler, if any, is set to the epoch.
        run_epoch: ``run_epoch(epoch) -> record``: trains one epoch and returns its metrics line.
        checkpoint: ``checkpoint(epoch, record) -> dict`` in the project's schema.
        periodic: ``periodic(epoch) -> file name`` of an extra checkpoint to keep, or None.
        ctx: this process (default: a single one).
    """
    ctx = ctx or DistContext(0, 1, torch.device("cpu"))
    start = time.time()
    for epoch in epochs:
        seed_epoch(seed, epoch, rank=ctx.rank, generator=loader.generator)
        set_sampler_epoch(loader, epoch)
        record = {"epoch": epoch, **run_epoch(epoch), "world_size": ctx.world_size}
        if run is not None:
            record["time_s"] = time.time() - start
            ckpt = checkpoint(epoch, record)
            ckpt["rng_state"] = rng_state()
            run.end_epoch(ckpt, record, extra_name=periodic(epoch))
        barrier(ctx)
    if run is not None:
        print(f"Training took {time.time() - start:.1f} s; run directory: {run.path}")
