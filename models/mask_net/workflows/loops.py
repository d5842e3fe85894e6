"""The 2D epoch loops: one training pass and the validation loss of a Mask R-CNN (or, with a loss
function, of COVID-CT-Mask-Net's classifier). The 3D track's loops live in ``models.volumetric``.

The loops take explicit arguments (model, loader, optimizer, device) and return plain floats, so the
pipelines stay thin. A detection model in training mode returns a dict of losses; validation loss is
computed in that mode but without gradients and without touching BatchNorm running statistics
(the original updated both).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from utils.training import backward_step

_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


def move_to_device(images, targets, device: torch.device):
    """Move a detection batch (list of images, list of target dicts) to ``device``."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


@contextlib.contextmanager
def frozen_batchnorm_stats(model: torch.nn.Module) -> Iterator[None]:
    """Keep BatchNorm layers in eval mode (running statistics frozen) inside the block.

    The rest of the model keeps its mode, so a detection model in ``train()`` still returns losses.
    """
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


def _sum_losses(loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(loss_dict.values())


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, epoch: int, loss_fn: Callable | None = None,
                    scaler: torch.amp.GradScaler | None = None, freeze_bn_stats: bool = False,
                    max_steps: int | None = None, progress: bool = True) -> dict[str, float]:
    """One pass over ``loader`` with optimizer steps.

    Args:
        model: a detection model returning a loss dict in train mode, or any model when ``loss_fn``
            is given.
        loader: yields ``(images, targets)``; images a list of FloatTensor[3,H,W], targets a list of
            dicts (detection) or a tensor (classification, with ``loss_fn``).
        optimizer: the optimizer.
        device: where to run.
        epoch: shown in the progress bar.
        loss_fn: ``loss_fn(model, images, targets) -> dict of losses``; default: ``model(images, targets)``.
        scaler: a GradScaler for mixed precision on CUDA, or None.
        freeze_bn_stats: keep BatchNorm running statistics frozen while training.
        max_steps: stop after this many batches (smoke runs); None for the whole loader.
        progress: show a tqdm bar with the running losses.

    Returns:
        Mean of each loss over the epoch, and ``loss`` (their sum).

    Raises:
        FloatingPointError: when the loss becomes NaN or infinite (naming the epoch and step).
    """
    model.train()
    totals: dict[str, float] = {}
    bar = tqdm(_take(loader, max_steps), desc=f"epoch {epoch} train", disable=not progress, leave=False)
    bn_ctx = frozen_batchnorm_stats(model) if freeze_bn_stats else contextlib.nullcontext()
    with bn_ctx:
        for step, batch in enumerate(bar):
            losses = _forward_losses(model, batch, device, loss_fn, amp=scaler is not None)
            total = _sum_losses(losses)
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss is {total.item()} at epoch {epoch}, step {step}: {_fmt(losses)}")
            optimizer.zero_grad(set_to_none=True)
            backward_step(total, optimizer, scaler)
            _accumulate(totals, losses, total)
            bar.set_postfix({k: f"{v / totals['steps']:.3f}" for k, v in totals.items() if k != "steps"})
    return _means(totals)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: Iterable, *, device: torch.device, epoch: int = 0,
                    loss_fn: Callable | None = None, max_steps: int | None = None,
                    progress: bool = True) -> dict[str, float]:
    """Mean losses over ``loader`` with no gradients and BatchNorm statistics left untouched."""
    was_training = model.training
    model.train()
    totals: dict[str, float] = {}
    bar = tqdm(_take(loader, max_steps), desc=f"epoch {epoch} val", disable=not progress, leave=False)
    try:
        with frozen_batchnorm_stats(model):
            for batch in bar:
                losses = _forward_losses(model, batch, device, loss_fn, amp=False)
                _accumulate(totals, losses, _sum_losses(losses))
    finally:
        model.train(was_training)
    return _means(totals)


def _take(loader: Iterable, max_steps: int | None):
    """The loader, or its first ``max_steps`` batches (with a length for the progress bar)."""
    if max_steps is None:
        return loader
    total = min(len(loader), max_steps) if hasattr(loader, "__len__") else max_steps
    return _Sized(itertools.islice(iter(loader), max_steps), total)


def _forward_losses(model, batch, device, loss_fn, *, amp: bool) -> dict[str, torch.Tensor]:
    images, targets = batch[0], batch[1]
    if isinstance(targets, (list, tuple)):
        images, targets = move_to_device(images, targets, device)
    else:
        images, targets = [img.to(device) for img in images], targets.to(device)
    with torch.autocast(device_type=device.type, enabled=amp):
        return loss_fn(model, images, targets) if loss_fn else model(images, targets)


def _accumulate(totals: dict[str, float], losses: dict[str, torch.Tensor], total: torch.Tensor) -> None:
    for k, v in losses.items():
        totals[k] = totals.get(k, 0.0) + float(v.detach())
    totals["loss"] = totals.get("loss", 0.0) + float(total.detach())
    totals["steps"] = totals.get("steps", 0) + 1


class _Sized:
    """An iterable with a known length (so tqdm shows a total)."""

    def __init__(self, iterable, total: int):
        self.iterable, self.total = iterable, total

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self):
        return self.total


def _means(totals: dict[str, float]) -> dict[str, float]:
    """Per-step means of the accumulated losses (NaN for an empty loader)."""
    steps = totals.pop("steps", 0)
    return {k: v / steps for k, v in totals.items()} if steps else {"loss": math.nan}


def _fmt(losses: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
