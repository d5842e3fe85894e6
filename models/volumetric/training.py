"""Training stages of the volumetric tasks: datasets, loaders, one epoch, validation Dice.

A task whose stages differ (classification, self-supervised pre-training) names its own in its
:class:`models.volumetric.task.Task`; these are the segmentation defaults.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its DistributedSampler share; only
rank 0 validates, logs and writes checkpoints, the others wait at a barrier. The process group is
set up by :mod:`utils.distributed`, which every trainer shares.
"""
from __future__ import annotations

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose
from tqdm import tqdm

from models.volumetric.common import IMAGE_KEY, LABEL_KEY, apply_transform, unwrap_transform_error
from models.volumetric.config import SegConfig
from models.volumetric.sliding_window import segment
from utils.amp import autocast
from utils.dice import dice_per_class, mean_ignoring_nan
from utils.distributed import DistContext, train_shuffling
from utils.training import backward_step


def make_datasets(task, config: SegConfig, *, train_cases: list[dict], val_cases: list[dict],
                  cache_rate: float) -> tuple[Dataset, Dataset]:
    """CacheDatasets for training (pre-processing cached, augmentation per sample) and validation.

    Args:
        task: the :class:`models.volumetric.task.Task` (its pre-processing and augmentation).
        config: its settings.
        train_cases, val_cases: the datalist's two sections.
        cache_rate: fraction of pre-processed cases kept in memory.

    Raises:
        ValueError: naming the case when one cannot be loaded (unreadable, 2D, shapes differ).
    """
    if not 0.0 <= cache_rate <= 1.0:
        raise ValueError(f"cache_rate must lie in [0, 1], got {cache_rate}")
    pre = task.preprocessing(config, keys=(IMAGE_KEY, LABEL_KEY))
    train_tf = Compose(pre + task.augmentation(config))
    val_tf = Compose(task.preprocessing(config, keys=(IMAGE_KEY, LABEL_KEY)))
    try:
        train = CacheDataset(train_cases, train_tf, cache_rate=cache_rate, num_workers=0, progress=False)
        val = CacheDataset(val_cases, val_tf, cache_rate=cache_rate, num_workers=0, progress=False)
    except RuntimeError as err:
        raise unwrap_transform_error(err) from err
    return train, val


def make_train_loader(dataset: Dataset, *, batch_size: int, ctx: DistContext, seed: int,
                      num_workers: int = 0) -> DataLoader:
    """Shuffled loader; a DistributedSampler splits the cases between processes under DDP.

    The shuffle order comes from the loader's ``generator`` (re-seeded each epoch by the trainer) or
    the sampler's ``set_epoch``. A last batch of a single case is dropped: BatchNorm cannot train on
    one case whose features have shrunk to one voxel (covid_cls at a small ``roi_size``).
    """
    shuffling = train_shuffling(dataset, ctx, seed)
    sampler = shuffling.get("sampler")
    per_process = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(dataset, batch_size=batch_size, **shuffling,
                      num_workers=num_workers, pin_memory=ctx.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed),
                      drop_last=batch_size > 1 and per_process % batch_size == 1 and per_process > 1)


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, *, optimizer: torch.optim.Optimizer,
                    loss_fn: torch.nn.Module, device: torch.device, scaler: torch.amp.GradScaler | None,
                    amp: bool, progress: bool, desc: str = "train") -> float:
    """One pass over ``loader``; returns the mean loss of this process.

    Batches are dicts with ``image`` Float[B, 1, x, y, z] and ``label`` Float[B, 1, x, y, z].

    Raises:
        FloatingPointError: when the loss is not finite.
    """
    model.train()
    total, steps = 0.0, 0
    for batch in tqdm(_batches(loader), desc=desc, total=len(loader), disable=not progress, leave=False):
        images, labels = batch[IMAGE_KEY].to(device), batch[LABEL_KEY].to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn(model(images), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {steps}")
        backward_step(loss, optimizer, scaler)
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


def evaluate_dice(model: torch.nn.Module, dataset: Dataset, *, task, config: SegConfig,
                  device: torch.device, amp: bool = False, progress: bool = False,
                  ignore_empty: bool = False) -> dict:
    """Sliding-window Dice of every validation case on the task's working grid.

    Args:
        ignore_empty: leave cases with empty ground truth out of the mean (NaN in ``per_case``)
            instead of the 1.0/0.0 convention of utils.dice.

    Returns:
        ``{"dice": mean over cases, "per_case": list of floats}``.
    """
    model.eval()
    post = task.postprocessing(config)
    scores = []
    for index in tqdm(range(len(dataset)), desc="validate", disable=not progress, leave=False):
        item = apply_transform(dataset.__getitem__, index)
        pred = post(segment(model, item[IMAGE_KEY], config=config, device=device, amp=amp))
        truth = (item[LABEL_KEY] > 0).to(torch.uint8)
        scores.append(dice_per_class(pred, truth, num_classes=2, ignore_empty=ignore_empty)[0])
    return {"dice": mean_ignoring_nan(scores), "per_case": scores}


def _batches(loader: DataLoader):
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            raise unwrap_transform_error(err) from err
