"""The 2D epoch loops: one training pass and the validation loss of a Mask R-CNN (or, with a loss
function, of COVID-CT-Mask-Net's classifier), and a Mask R-CNN's validation mask AP and RPN recall.
The 3D track's loops live in ``models.volumetric``.

Training diagnostics: the RPN and the RoI heads record the (positive, sampled) counts of their last
training batch in ``last_sampling``; :func:`train_one_epoch` sums them into ``rpn_pos_fraction`` and
``roi_pos_fraction``.

The loops take explicit arguments (model, loader, optimizer, device) and return plain floats, so the
pipelines stay thin. A detection model in training mode returns a dict of losses; validation loss is
computed in that mode but without gradients and without touching BatchNorm running statistics
(the original updated both). Under DDP :func:`train_one_epoch` runs the wrapped model, and the
validation functions run on rank 0 with the unwrapped one (a DDP forward on one rank alone would wait
for the others).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Iterable, Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import box_iou
from tqdm import tqdm

from models.mask_net.fast.poolers import use_gather_poolers
from models.mask_net.transform import resize_boxes
from utils.amp import autocast
from utils.distributed import DistContext, distribute, unwrap
from utils.mean_ap import mean_average_precision
from utils.training import RunConfig, backward_step, lr_setter, make_optimizer, steps_per_epoch


def prepare_training(model: torch.nn.Module, config: RunConfig, ctx: DistContext, loader: Iterable
                     ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[int], Callable[[int], None] | None]]:
    """What both 2D trainers do before their epochs: move the model to ``ctx.device``, pool RoIs by row
    gathers on CPU (torchvision's CPU RoIAlign backward runs on one thread), build the optimizer and
    the lr schedule, and under DDP wrap the model (:func:`utils.distributed.distribute`, with
    ``config.sync_bn``).

    Returns:
        The model to train (DDP-wrapped under torchrun, else ``model``), the optimizer (over ``model``'s
        parameters) and ``set_lr_for(epoch)``, the ``set_lr`` of :func:`train_one_epoch` for that epoch
        (None for a constant lr).
    """
    model.to(ctx.device)
    if ctx.device.type == "cpu":
        use_gather_poolers(model.roi_heads)
    optimizer = make_optimizer(model, config)
    schedule = lr_setter(config, optimizer, steps_per_epoch(loader, config.max_steps))
    net = distribute(model, ctx, sync_bn=config.sync_bn)
    return net, optimizer, lambda epoch: schedule(epoch) if schedule else None


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
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
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
                    amp: bool = False, scaler: torch.amp.GradScaler | None = None, freeze_bn_stats: bool = False,
                    max_steps: int | None = None, progress: bool = True,
                    set_lr: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over ``loader`` with optimizer steps.

    Args:
        model: a detection model returning a loss dict in train mode, or any model when ``loss_fn``
            is given; under DDP the wrapped model (its sampling counts are read from the module inside).
        loader: yields ``(images, targets)``; images a list of FloatTensor[3,H,W], targets a list of
            dicts (detection) or a tensor (classification, with ``loss_fn``).
        optimizer: the optimizer.
        device: where to run.
        epoch: shown in the progress bar.
        loss_fn: ``loss_fn(model, images, targets) -> dict of losses``; default: ``model(images, targets)``.
        amp: run the forward pass under :func:`utils.amp.autocast` (bfloat16, or float16 on GPUs without it).
        scaler: the GradScaler of float16 training (:func:`utils.amp.grad_scaler`), or None.
        freeze_bn_stats: keep BatchNorm running statistics frozen while training.
        max_steps: stop after this many batches (smoke runs); None for the whole loader.
        progress: show a tqdm bar with the running losses.
        set_lr: ``set_lr(step)`` sets the learning rate before each step (a schedule), or None.

    Returns:
        Mean of each loss over the epoch, ``loss`` (their sum) and, for a Mask R-CNN, ``rpn_pos_fraction``
        and ``roi_pos_fraction`` (see :func:`sampling_fractions`).

    Raises:
        FloatingPointError: when the loss becomes NaN or infinite (naming the epoch and step).
    """
    model.train()
    totals: dict[str, float] = {}
    sampling: dict[str, list[int]] = {}
    bar = tqdm(_take(loader, max_steps), desc=f"epoch {epoch} train", disable=not progress, leave=False)
    bn_ctx = frozen_batchnorm_stats(model) if freeze_bn_stats else contextlib.nullcontext()
    with bn_ctx:
        for step, batch in enumerate(bar):
            losses = _forward_losses(model, batch, device, loss_fn, amp=amp)
            total = _sum_losses(losses)
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss is {total.item()} at epoch {epoch}, step {step}: {_fmt(losses)}")
            optimizer.zero_grad(set_to_none=True)
            if set_lr is not None:
                set_lr(step)
            backward_step(total, optimizer, scaler)
            _accumulate(totals, losses, total)
            _accumulate_sampling(sampling, unwrap(model))
            bar.set_postfix({k: f"{v / totals['steps']:.3f}" for k, v in totals.items() if k != "steps"})
    return {**_means(totals), **sampling_fractions(sampling)}


SAMPLING_STAGES = {"rpn": "rpn_pos_fraction", "roi_heads": "roi_pos_fraction"}


def _accumulate_sampling(sampling: dict[str, list[int]], model: torch.nn.Module) -> None:
    """Add the (positive, sampled) counts that the RPN and RoI heads recorded in their last training pass."""
    for stage in SAMPLING_STAGES:
        counts = getattr(getattr(model, stage, None), "last_sampling", None)
        if counts is not None:
            totals = sampling.setdefault(stage, [0, 0])
            totals[0], totals[1] = totals[0] + counts[0], totals[1] + counts[1]


def sampling_fractions(sampling: dict[str, list[int]]) -> dict[str, float]:
    """Positive share of the sampled anchors (``rpn_pos_fraction``) and RoIs (``roi_pos_fraction``).

    Args:
        sampling: stage ("rpn", "roi_heads") -> [positives, sampled], summed over the epoch's batches.

    Returns:
        Metric name -> positives / sampled over the whole epoch (NaN when nothing was sampled).
    """
    return {SAMPLING_STAGES[stage]: (pos / total if total else math.nan) for stage, (pos, total) in sampling.items()}


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
    with autocast(device, amp):
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


def proposal_recall(proposals: list[torch.Tensor], gt_boxes: list[torch.Tensor], *,
                    iou_thresholds: tuple[float, ...] = (0.5, 0.75)) -> dict[float, tuple[int, int]]:
    """Ground-truth boxes that at least one proposal covers at each IoU threshold.

    Args:
        proposals: per image, FloatTensor[P_i, 4] xyxy.
        gt_boxes: per image, FloatTensor[G_i, 4] xyxy, in the same pixels as the proposals.
        iou_thresholds: a box counts as found at threshold t when some proposal has IoU >= t with it.

    Returns:
        Threshold -> (found boxes, all boxes), summed over the images.
    """
    found = dict.fromkeys(iou_thresholds, 0)
    total = 0
    for props, gt in zip(proposals, gt_boxes):
        total += gt.shape[0]
        if gt.shape[0] == 0 or props.shape[0] == 0:
            continue
        best = box_iou(gt.to(props), props).max(dim=1).values  # (G_i,)
        for t in iou_thresholds:
            found[t] += int((best >= t).sum())
    return {t: (n, total) for t, n in found.items()}


class _ProposalRecorder:
    """Forward hook on the RPN that keeps its eval-mode proposals, scaled back to the input images' pixels."""

    def __init__(self, rpn: torch.nn.Module):
        self.proposals: list[torch.Tensor] = []
        self.original_sizes: list[tuple[int, int]] = []
        self.handle = rpn.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        batch, proposals = args[0], output[0]
        self.proposals = [resize_boxes(p, new, old).cpu()
                          for p, new, old in zip(proposals, batch.image_sizes, self.original_sizes)]


@torch.no_grad()
def validation_detection_metrics(model: torch.nn.Module, loader: Iterable, *, device: torch.device,
                                 epoch: int = 0, max_steps: int | None = None, progress: bool = True,
                                 mask_threshold: float = 0.5) -> dict[str, float]:
    """Mask AP and RPN recall of a Mask R-CNN over ``loader``, in eval mode (no score threshold beyond the model's).

    Args:
        model: a :class:`models.mask_net.mask_rcnn.MaskRCNN`; its mode is restored afterwards.
        loader: yields ``(images, targets)``: lists of FloatTensor[3, H, W] and target dicts with ``boxes``
            FloatTensor[G, 4], ``labels`` Int64Tensor[G] and ``masks`` UInt8Tensor[G, H, W].
        device: where to run.
        epoch: shown in the progress bar.
        max_steps: stop after this many batches; None for the whole loader.
        progress: show a tqdm bar.
        mask_threshold: predicted mask probability above which a pixel is lesion.

    Returns:
        ``segm_mAP`` and ``segm_AP50`` (COCO style, :func:`utils.mean_ap.mean_average_precision`) and
        ``rpn_recall50`` / ``rpn_recall75``: the share of ground-truth boxes with an RPN proposal at IoU >= 0.5 / 0.75.
    """
    was_training = model.training
    model.eval()
    recorder = _ProposalRecorder(model.rpn)
    predictions, targets, found = [], [], {0.5: 0, 0.75: 0}
    total = 0
    try:
        for images, batch_targets in tqdm(_take(loader, max_steps), desc=f"epoch {epoch} val AP",
                                          disable=not progress, leave=False):
            recorder.original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
            outputs = model([img.to(device) for img in images])
            predictions += [{k: v.cpu() for k, v in out.items()} for out in outputs]
            targets += [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in t.items()} for t in batch_targets]
            recall = proposal_recall(recorder.proposals, [t["boxes"].cpu() for t in batch_targets])
            for t, (n, g) in recall.items():
                found[t] += n
            total += recall[0.5][1]
    finally:
        recorder.handle.remove()
        model.train(was_training)
    return {**segm_ap(predictions, targets, mask_threshold=mask_threshold),
            "rpn_recall50": found[0.5] / total if total else math.nan,
            "rpn_recall75": found[0.75] / total if total else math.nan}


def segm_ap(predictions: list[dict], targets: list[dict], *, mask_threshold: float) -> dict[str, float]:
    """COCO-style mask ``segm_mAP`` (IoU 0.50:0.95) and ``segm_AP50`` of the predictions (NaN without any)."""
    if not predictions:
        return {"segm_mAP": math.nan, "segm_AP50": math.nan}
    res = mean_average_precision(predictions, targets, iou_type="segm", style="coco", mask_threshold=mask_threshold)
    return {"segm_mAP": float(res["mAP"]), "segm_AP50": float(res["AP50"])}
