"""Training run of a volumetric task: what ``train_volumetric.py`` runs, single-process or under ``torchrun``.

The datalist's ``training`` section is trained on and its ``validation`` section selects
``checkpoint_best.pth`` by the task's selection metric (mean sliding-window Dice unless the task
names another). Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its share; only rank
0 validates, logs and writes checkpoints, the others wait at a barrier. The run directory holds
args.json, env.txt, metrics.jsonl and the checkpoints; a checkpoint also stores the task's settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from models.volumetric import get_task
from models.volumetric.common import TRAINING, VALIDATION, load_cases
from models.volumetric.task import Task
from models.volumetric.training import make_datasets, make_train_loader
from utils.amp import checkpoint_entries as amp_entries
from utils.amp import grad_scaler, precision
from utils.checkpoint import make_checkpoint
from utils.cli import resolve_device
from utils.distributed import (
    DistContext,
    barrier,
    cleanup_distributed,
    distribute,
    means_over_ranks,
    set_sampler_epoch,
    setup_distributed,
)
from utils.reproducibility import rng_state, seed_epoch, seed_everything
from utils.run_dir import Best, RunDir, check_run_dir
from utils.training import current_lr, lr_factor, resume_training


@dataclass(frozen=True)
class TrainSettings:
    """What a training run needs.

    Attributes:
        task: registry name of the task.
        datalist: dataset.json with ``training`` and ``validation`` sections.
        save_dir: run directory.
        data_root: folder the datalist paths are relative to (None: the datalist's folder).
        epochs: the run ends after this many epochs in total; a resumed run continues to it.
        lr: Adam learning rate (None: the task's).
        lr_schedule: the lr of each epoch, ``utils.training.lr_factor`` over the epochs (constant, cosine, step).
        warmup_epochs: the schedule's lr of the first N epochs times a linear ramp from 0.001 to 1.
        batch_size: crops per step and process.
        cache_rate: fraction of pre-processed cases kept in memory.
        workers: DataLoader worker processes.
        val_every: validate every N epochs and at the last one.
        progress: show progress bars (rank 0).
        amp: mixed precision (:mod:`utils.amp`).
        device: torch device name; under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``.
        seed: base seed (each process adds its rank).
        resume: checkpoint to resume from.
        overwrite: start anew in a ``save_dir`` that holds a run, moving its files aside.
        config: settings replacing the task's defaults (None values ignored).
        network: builder keywords replacing the task's defaults.
        pretrained: option of ``Task.pretrained`` -> weights file, loaded into the built network.
        record: the arguments written to args.json and checkpoints (default: these settings).
    """

    task: str
    datalist: str
    save_dir: str
    data_root: str | None = None
    epochs: int = 100
    lr: float | None = None
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    batch_size: int = 2
    cache_rate: float = 1.0
    workers: int = 0
    val_every: int = 1
    progress: bool = True
    amp: bool = False
    device: str = "cpu"
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    config: dict = field(default_factory=dict)
    network: dict = field(default_factory=dict)
    pretrained: dict = field(default_factory=dict)
    record: dict | None = None

    def args(self) -> dict:
        """The run's arguments for args.json and checkpoints."""
        if self.record is not None:
            return self.record
        return {k: v for k, v in asdict(self).items() if k != "record"}


@dataclass
class _Run:
    """The parts of a training run that each epoch's end needs."""

    settings: TrainSettings
    task: Task
    config: Any
    model: torch.nn.Module
    kwargs: dict
    optimizer: torch.optim.Optimizer
    val_set: Any
    run_dir: RunDir | None
    ctx: DistContext
    scaler: torch.amp.GradScaler | None


def train(settings: TrainSettings) -> dict:
    """Train; returns the last epoch's metrics record (on every rank)."""
    check_run_dir(settings.save_dir, resume=bool(settings.resume), overwrite=settings.overwrite)
    ctx = setup_distributed(resolve_device(settings.device))
    try:
        return _train(settings, ctx)
    finally:
        cleanup_distributed(ctx)


def network_overrides(task: Task, config: Any, given: dict) -> dict:
    """Builder keywords: those that follow the config (a ViT's ``img_size``), then those ``given``.

    Raises:
        ValueError: for a given keyword the task's builder does not take.
    """
    unknown = sorted(k for k, v in given.items() if v is not None and k not in task.network_kwargs)
    if unknown:
        raise ValueError(f"--{', --'.join(unknown)} do not apply to task {task.name}")
    return {**task.network_for_config(config), **{k: v for k, v in given.items() if v is not None}}


def build_model(task: Task, config: Any, *, network: dict, pretrained: dict) -> tuple[torch.nn.Module, dict]:
    """The task's network with ``network`` keywords, then the ``pretrained`` weights loaded into it.

    Raises:
        ValueError: for a pre-trained option the task does not have.
    """
    model, kwargs = task.build_network(**network_overrides(task, config, network))
    for option, path in pretrained.items():
        if path is None:
            continue
        if option not in task.pretrained:
            raise ValueError(f"--{option} does not apply to task {task.name}")
        task.pretrained[option](model, path)
    return model, kwargs


def resume(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: RunDir | None,
           task: Task, lr: float | None, scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore model, optimizer, loss scale, RNG states and best-so-far value; returns the first epoch to run."""
    start, ckpt = resume_training(path, model=model, optimizer=optimizer, run=run_dir, builder=task.builder,
                                  scaler=scaler,
                                  kind=f"{task.name} training",
                                  hyperparameters={"lr": lr})
    if ckpt.get("task") != task.name:
        raise ValueError(f"--resume {path}: checkpoint is for task {ckpt.get('task')!r}, not {task.name!r}")
    return start


def _train(s: TrainSettings, ctx: DistContext) -> dict:
    seed_everything(s.seed + ctx.rank)
    task = get_task(s.task)
    config = task.make_config(**s.config)
    train_set, val_set = _datasets(s, task, config)
    loader = make_train_loader(train_set, batch_size=s.batch_size, ctx=ctx, seed=s.seed, num_workers=s.workers)
    model, kwargs = build_model(task, config, network=s.network, pretrained=s.pretrained)
    lr = s.lr or task.default_lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    run_dir = RunDir(s.save_dir, args=s.args(), seed=s.seed, resume=bool(s.resume), overwrite=s.overwrite,
                     best=_best(task)) if ctx.is_main else None
    # a scheduled lr is set every epoch, so only a constant one is compared with the checkpoint's
    constant_lr = lr if s.lr_schedule == "constant" and not s.warmup_epochs else None
    scaler = grad_scaler(ctx.device, s.amp)
    start = 0
    if s.resume:
        start = resume(s.resume, model=model, optimizer=optimizer, run_dir=run_dir, task=task, lr=constant_lr,
                       scaler=scaler)
    model.to(ctx.device)
    net = distribute(model, ctx)
    run = _Run(s, task, config, model, kwargs, optimizer, val_set, run_dir, ctx, scaler)
    record: dict = {}
    for epoch in range(start, s.epochs):
        seed_epoch(s.seed, epoch, rank=ctx.rank, generator=loader.generator, dataset=train_set)
        set_sampler_epoch(loader, epoch)
        for group in optimizer.param_groups:  # a function of the epoch alone, so a resumed run keeps its curve
            group["lr"] = lr * lr_factor(s.lr_schedule, epoch, s.epochs, warmup=s.warmup_epochs)
        loss = task.train_one_epoch(net, loader, optimizer=optimizer, loss_fn=task.loss(), device=ctx.device,
                                    scaler=scaler, amp=s.amp, progress=ctx.is_main and s.progress,
                                    desc=f"epoch {epoch}")
        losses = loss if isinstance(loss, dict) else {"loss": loss}  # ssl_pretrain logs its terms too
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in means_over_ranks(losses, ctx).items()},
                  "lr": current_lr(optimizer), "world_size": ctx.world_size}
        if run_dir is not None:
            record = _end_epoch(run, record)
        barrier(ctx)
    return record


def _best(task: Task) -> Best:
    """The selection of ``checkpoint_best.pth``: the task's metric, ties broken by its ``tie_break``."""
    metric, higher = task.selection_metric
    tie, tie_higher = task.tie_break or (None, False)
    return Best(f"val_{metric}", higher, tie_metric=tie and f"val_{tie}", tie_higher_is_better=tie_higher)


def _datasets(s: TrainSettings, task: Task, config: Any):
    """Training and validation datasets from the datalist's two sections."""
    train_cases = load_cases(s.datalist, data_root=s.data_root, section=TRAINING)
    val_cases = load_cases(s.datalist, data_root=s.data_root, section=VALIDATION)
    if not train_cases or not val_cases:
        raise ValueError(f"{s.datalist}: needs cases in both '{TRAINING}' and '{VALIDATION}' sections, "
                         f"got {len(train_cases)} and {len(val_cases)}")
    return make_datasets(task, config, train_cases=train_cases, val_cases=val_cases, cache_rate=s.cache_rate)


def _end_epoch(run: _Run, record: dict) -> dict:
    """Rank 0: validate when due, save last (and best when the selection metric improved), then log."""
    s, task, epoch = run.settings, run.task, record["epoch"]
    if (epoch + 1) % s.val_every == 0 or epoch + 1 == s.epochs:
        result = task.evaluate(run.model, run.val_set, task=task, config=run.config, device=run.ctx.device, amp=s.amp)
        record.update({f"val_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    ckpt = make_checkpoint(model=run.model, builder=task.builder, builder_kwargs=run.kwargs, epoch=epoch,
                           args=s.args(), optimizer=run.optimizer, task=task.name,
                           task_config=run.config.to_dict(), metrics=dict(record),
                           **amp_entries(run.scaler, precision(run.ctx.device, s.amp)))
    ckpt["rng_state"] = rng_state()
    record["best"] = run.run_dir.end_epoch(ckpt, record)
    print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in record.items() if k != "epoch"), flush=True)
    return record
