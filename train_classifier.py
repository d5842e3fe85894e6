"""Train COVID-CT-Mask-Net's classification module S on top of a trained segmentation model.

Canonical command (the original README's, with the phantom data directories)::

    python train_classifier.py --pretrained_segmentation_model seg.pth --backbone_name resnet34 \
        --num_epochs 50 --save_every 10 --num_class 2 --truncation 1 --s_features 512 \
        --roi_batch_size 128 --batch_size 8 \
        --train_data_dir data/phantom/cls/train --val_data_dir data/phantom/cls/val

Weights of the backbone, FPN, RPN and RoI box branch are copied by name from the segmentation
checkpoint (its mask-branch weights are ignored); a classification checkpoint
(``--pretrained_classification_model``) loads strictly. Only S and the affine parameters of the
backbone's BatchNorm layers are trained; BatchNorm running statistics stay frozen and every other
parameter has ``requires_grad=False``. The default loss is the original's binary cross-entropy with
logits on one-hot labels (``--loss ce`` for cross-entropy). The run directory (``--save_dir``) receives
args.json, env.txt, metrics.jsonl, checkpoint_last.pth, checkpoint_best.pth (lowest validation loss so far, kept across --resume)
and every ``--save_every`` epochs ``<model_name>_ckpt_<epoch>.pth``.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets.classification import SliceClassificationDataset
from datasets.conventions import CLASS_NAMES
from evaluate_classifier import BUILDER, add_architecture_args, check_architecture, collate_slices, predict_logits
from models.mask_net.covid_mask_net import covid_mask_net, load_segmentation_weights
from utils.checkpoint import load_checkpoint, make_checkpoint
from utils.cli import (
    add_device_args,
    add_epoch_args,
    add_optimisation_args,
    add_run_args,
    add_seed_args,
    args_to_dict,
    positive_int,
    resolve_device,
    run_cli,
)
from utils.engine import train_one_epoch
from utils.reproducibility import seed_everything, worker_init_fn
from utils.run_dir import RunDir, check_run_dir
from utils.training import current_lr, load_weights, refuse_distributed, resume_training, run_epochs

SEGMENTATION_BUILDER = "models.mask_net.maskrcnn_resnet_fpn"
DEFAULT_ROI_BATCH_SIZE, DEFAULT_S_FEATURES = 128, 512
# Segmentation builder settings the classifier does not inherit (mask branch, detection filtering);
# everything else (architecture, transform, anchors, RPN) carries over so that the weights fit.
NOT_INHERITED = ("with_masks", "mask_layers", "mask_roi_size", "box_score_thresh", "box_detections_per_img",
                 "box_nms_thresh", "pretrained_backbone")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_segmentation_model", default=None,
                   help="segmentation checkpoint whose weights (mask branch excluded) initialise the model (default: none)")
    p.add_argument("--pretrained_classification_model", default=None,
                   help="classification checkpoint loaded strictly; takes precedence over the segmentation one (default: none)")
    add_architecture_args(p)
    add_epoch_args(p, model_name="covid_ct_mask_net")
    add_run_args(p, default_save_dir="runs/classifier")
    p.add_argument("--train_data_dir", default="data/phantom/cls/train", help="training slices (default: data/phantom/cls/train)")
    p.add_argument("--val_data_dir", default="data/phantom/cls/val", help="validation slices (default: data/phantom/cls/val)")
    p.add_argument("--split_file", default=None,
                   help="COVIDx-CT split file selecting the training slices of --train_data_dir (default: every image)")
    p.add_argument("--val_split_file", default=None,
                   help="COVIDx-CT split file selecting the validation slices of --val_data_dir (default: every image)")
    p.add_argument("--crop_to_box", action="store_true", help="crop slices to the split file's lung box (default: off)")
    p.add_argument("--image_size", type=positive_int, default=None,
                   help="short side the model resizes slices to, long side capped at 2x (default: the segmentation model's)")
    p.add_argument("--loss", default="bce", choices=["bce", "ce"],
                   help="bce: binary cross-entropy with logits on one-hot labels, as the original; ce: cross-entropy (default: bce)")
    p.add_argument("--class_balance", action="store_true",
                   help="weight each slice's loss by the inverse frequency of its class in the training set (default: off)")
    add_optimisation_args(p, batch_size=8, unit="slices")
    add_device_args(p)
    add_seed_args(p)
    return p


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, kind: str = "bce",
                        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of S's logits.

    Args:
        logits: Float[N, 3].
        labels: Int64[N] in {0, 1, 2}.
        kind: ``bce`` (binary cross-entropy with logits on one-hot labels) or ``ce`` (cross-entropy).
        class_weights: Float[3] weight of each true class, or None.

    Returns:
        Scalar loss averaged over the slices (weighted mean when ``class_weights`` is given).
    """
    weights = torch.ones_like(labels, dtype=logits.dtype) if class_weights is None else class_weights.to(logits)[labels]
    if kind == "ce":
        per_slice = F.cross_entropy(logits, labels, reduction="none")
    elif kind == "bce":
        one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        per_slice = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").mean(dim=1)
    else:
        raise ValueError(f"loss must be 'bce' or 'ce', got {kind!r}")
    return (per_slice * weights).sum() / weights.sum()


def inverse_frequency_weights(labels: list[int], num_classes: int = 3) -> torch.Tensor:
    """Float[K] class weights n / (K * count_k), so that a balanced set gets all ones; 0 for absent classes."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(counts.sum(), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.as_tensor(weights, dtype=torch.float32)


def make_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """Shuffled (seeded) training loader and validation loader in file order.

    Raises:
        ValueError: for ``--crop_to_box`` without both split files (they hold the boxes).
    """
    if args.crop_to_box and (args.split_file is None or args.val_split_file is None):
        raise ValueError("--crop_to_box needs --split_file and --val_split_file: the boxes come from the split files")
    def dataset(root, split_file):
        return SliceClassificationDataset(root, split_file=split_file, crop_to_box=args.crop_to_box)

    train_set = dataset(args.train_data_dir, args.split_file)
    val_set = dataset(args.val_data_dir, args.val_split_file)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_slices,
                  worker_init_fn=worker_init_fn)
    generator = torch.Generator().manual_seed(args.seed)
    return DataLoader(train_set, shuffle=True, generator=generator, **common), DataLoader(val_set, shuffle=False, **common)


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Model and its builder kwargs, from (in this order) ``--resume``, the classification or the
    segmentation checkpoint.

    Raises:
        ValueError: when no checkpoint is given, or a flag contradicts the checkpoint.
    """
    path = args.resume or args.pretrained_classification_model or args.pretrained_segmentation_model
    if path is None:
        raise ValueError("give --pretrained_segmentation_model (or --pretrained_classification_model / --resume): "
                         "S is trained on top of a segmentation model and cannot be trained from scratch")
    if args.pretrained_classification_model and args.pretrained_segmentation_model:
        print(f"both pretrained models given: using {path}, ignoring the segmentation model")
    wanted = (BUILDER,) if path != args.pretrained_segmentation_model else (SEGMENTATION_BUILDER, BUILDER)
    ckpt = load_checkpoint(path, builder=wanted, kind="classification" if len(wanted) == 1 else None)
    check_architecture(path, ckpt["builder_kwargs"], vars(args))
    if ckpt["builder"] == BUILDER:
        kwargs = {**ckpt["builder_kwargs"], **_setting_overrides(args)}
        model = covid_mask_net(**kwargs)
        load_weights(model, ckpt["model"], path)
        print(f"loaded classification checkpoint {path} strictly")
        return model, kwargs
    kwargs = _kwargs_from_segmentation(args, ckpt["builder_kwargs"])
    model = covid_mask_net(**kwargs)
    counts = load_segmentation_weights(model, ckpt["model"], source=path)
    print(f"segmentation weights from {path}: {counts['loaded']} tensors loaded, {counts['ignored_mask']} mask-branch "
          f"tensors ignored, {counts['new']} new tensors (module S) initialised")
    return model, kwargs


def _kwargs_from_segmentation(args: argparse.Namespace, seg_kwargs: dict) -> dict:
    kwargs = {k: v for k, v in seg_kwargs.items() if k not in NOT_INHERITED}
    for key in ("backbone_name", "truncation", "num_classes"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    kwargs["roi_batch_size"] = args.roi_batch_size or DEFAULT_ROI_BATCH_SIZE
    kwargs["s_features"] = args.s_features or DEFAULT_S_FEATURES
    return {**kwargs, **_setting_overrides(args)}


def _setting_overrides(args: argparse.Namespace) -> dict:
    """Builder settings from flags that leave parameter shapes alone (NMS thresholds, image size)."""
    out = {}
    if args.rpn_nms_th is not None:
        out["rpn_nms_thresh"] = args.rpn_nms_th
    if args.roi_nms_th is not None:
        out["box_nms_thresh"] = args.roi_nms_th
    if args.image_size is not None:
        out.update(min_size=args.image_size, max_size=2 * args.image_size)
    return out


def main(args: argparse.Namespace) -> RunDir:
    refuse_distributed("train_classifier.py")
    check_run_dir(args.save_dir, resume=bool(args.resume), overwrite=args.overwrite)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    train_loader, val_loader = make_loaders(args)
    model, kwargs = build_model(args)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} "
          "(module S and the backbone's BatchNorm affine parameters)")
    optimizer = torch.optim.Adam(trainable, lr=args.lrate, weight_decay=args.weight_decay)
    run = RunDir(args.save_dir, args=args_to_dict(args), seed=args.seed, resume=bool(args.resume),
                 overwrite=args.overwrite)
    first_epoch = args.start_epoch
    if args.resume:
        first_epoch, _ = resume_training(args.resume, model=model, optimizer=optimizer, run=run, builder=BUILDER,
                                         kind="classification", hyperparameters={"lr": args.lrate,
                                                                                 "weight_decay": args.weight_decay})
    weights = inverse_frequency_weights(train_loader.dataset.labels) if args.class_balance else None
    train_epochs(args, model=model, optimizer=optimizer, loaders=(train_loader, val_loader), run=run, builder_kwargs=kwargs,
                 first_epoch=first_epoch, device=device, class_weights=weights)
    return run


def train_epochs(args, *, model, optimizer, loaders, run: RunDir, builder_kwargs: dict, first_epoch: int,
                 device: torch.device, class_weights: torch.Tensor | None) -> None:
    """Epoch loop: train S (BatchNorm statistics frozen), validation loss and accuracy, checkpoints, metrics."""
    train_loader, val_loader = loaders

    def loss_fn(m, images, labels):
        return {"loss_cls": classification_loss(m(images), labels, kind=args.loss, class_weights=class_weights)}

    def run_epoch(epoch: int) -> dict:
        train = train_one_epoch(model, train_loader, optimizer, device=device, epoch=epoch, loss_fn=loss_fn,
                                freeze_bn_stats=True, max_steps=args.max_steps, progress=not args.no_progress)
        val = validate(model, val_loader, device=device, loss_kind=args.loss, max_steps=args.max_steps,
                       progress=not args.no_progress)
        print(f"Epoch {epoch}: train loss = {train['loss']:.3f}, validation loss = {val['loss']:.3f}, "
              f"validation accuracy = {val['accuracy']:.3f}")
        return {"train_loss": train["loss"], **{f"val_{k}": v for k, v in val.items()}, "lr": current_lr(optimizer)}

    def checkpoint(epoch: int, record: dict) -> dict:
        return make_checkpoint(model=model, optimizer=optimizer, epoch=epoch, args=args_to_dict(args), builder=BUILDER,
                               builder_kwargs=builder_kwargs, class_names=list(CLASS_NAMES),
                               val_loss=record["val_loss"], val_accuracy=record["val_accuracy"])

    run_epochs(run=run, epochs=range(first_epoch, args.start_epoch + args.num_epochs), seed=args.seed,
               loader=train_loader, run_epoch=run_epoch, checkpoint=checkpoint,
               periodic=lambda e: f"{args.model_name}_ckpt_{e + 1}.pth" if (e + 1) % args.save_every == 0 else None)


def validate(model, loader, *, device: torch.device, loss_kind: str, max_steps: int | None = None,
             progress: bool = True) -> dict[str, float]:
    """Unweighted validation loss and accuracy, in eval mode (no gradients, no BatchNorm updates)."""
    logits, labels, _ = predict_logits(model, loader, device=device, progress=progress, max_steps=max_steps)
    loss = classification_loss(logits, labels, kind=loss_kind)
    return {"loss": float(loss), "accuracy": float((logits.argmax(dim=1) == labels).double().mean())}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
