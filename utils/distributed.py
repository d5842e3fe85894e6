"""Several processes under ``torchrun``: the process group, the model's DDP wrapper and the data split.

Every trainer joins the process group through :func:`setup_distributed` and leaves it through
:func:`cleanup_distributed` (gloo on CPU, nccl on CUDA). A single process (no ``WORLD_SIZE``, or 1)
gets a :class:`DistContext` of rank 0 of 1 and none of these functions communicate. Under DDP every
process trains on its :func:`train_shuffling` share; rank 0 alone writes the run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device, *, backend: str | None = None,
                      timeout: timedelta | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on CUDA), if any.

    Args:
        device: the requested device; under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``.
        backend: ``gloo`` or ``nccl`` instead of the device's (e.g. gloo for processes that only meet
            at barriers).
        timeout: how long a collective (a barrier) may wait for the other processes (None: torch's
            default, 10 to 30 minutes depending on the backend).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def cleanup_distributed(ctx: DistContext, *, wait: bool = True) -> None:
    """Leave the process group (no-op for a single process).

    Args:
        ctx: this process.
        wait: meet the other processes at a barrier first. A process that leaves on an error does
            not wait: the others may never get there, and torchrun stops them once it has exited.
    """
    if ctx.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op for a single process)."""
    if ctx.distributed:
        dist.barrier()


def on_main(ctx: DistContext, action: Callable[[], object]) -> object:
    """Run ``action`` on rank 0 while the other processes wait; an error there is raised on every rank.

    Returns:
        What ``action`` returned on rank 0, None on the other ranks.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = action()
        except Exception as err:  # handed to the other ranks, then raised here too
            error = err
    if ctx.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def means_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Each value's mean over the processes, in one all-reduce (``values`` itself for a single process).

    Every process must pass the same keys.
    """
    if not ctx.distributed:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    means = dict(zip(keys, (tensor / ctx.world_size).tolist()))
    return {k: means[k] for k in values}


def train_shuffling(dataset, ctx: DistContext | None, seed: int) -> dict:
    """DataLoader keywords of a shuffled training loader.

    A single process shuffles with the loader's ``generator`` (re-seeded every epoch by the trainer).
    Under DDP a :class:`DistributedSampler` (seeded by ``seed``; the trainer calls its ``set_epoch``)
    hands each process every ``world_size``-th index of one permutation, so an epoch shows every sample
    once across the processes; when ``world_size`` does not divide the dataset, it repeats a few samples
    to give every process the same number. ``ctx`` None is a single process.
    """
    if ctx is None or not ctx.distributed:
        return {"shuffle": True}
    return {"sampler": DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=seed)}


def set_sampler_epoch(loader, epoch: int) -> None:
    """Call ``set_epoch`` of the loader's DistributedSampler, if it has one (its shuffle order for ``epoch``)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def sync_batchnorm(model: torch.nn.Module) -> int:
    """Replace every BatchNorm that normalises with batch statistics in training by a SyncBatchNorm.

    Those are the ``_BatchNorm`` layers left in training mode by ``model.train()``. A torchvision
    ``FrozenBatchNorm2d`` is no BatchNorm here, and a layer that a model keeps in eval mode (the
    classifier's backbone) normalises with its running statistics, which syncing would not change; both
    stay as they are. The replacement keeps the parameters, buffers and state-dict keys.

    Returns:
        The number of layers replaced.
    """
    was_training = model.training
    model.train()
    names = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training
             and not isinstance(m, torch.nn.SyncBatchNorm)]
    model.train(was_training)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(parent, child)))
    return len(names)


def distribute(model: torch.nn.Module, ctx: DistContext, *, sync_bn: bool = False) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel under DDP (``model`` itself for a single process).

    Every trainable parameter of the 2D and 3D models takes part in each loss, so
    ``find_unused_parameters`` stays off. Attributes, ``state_dict`` and validation go through the
    unwrapped module (:func:`unwrap`).

    Args:
        model: the model, already on ``ctx.device``.
        ctx: this process.
        sync_bn: first convert the BatchNorm layers that train on batch statistics (:func:`sync_batchnorm`).

    Raises:
        ValueError: for ``sync_bn`` on CPU processes (SyncBatchNorm needs GPUs).
    """
    if not ctx.distributed:
        return model
    if sync_bn:
        if ctx.device.type != "cuda":
            raise ValueError("--sync_bn needs CUDA devices: SyncBatchNorm does not run on CPU processes")
        print(f"--sync_bn: {sync_batchnorm(model)} BatchNorm layers synchronised across processes")
    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
