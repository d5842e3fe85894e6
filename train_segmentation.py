"""Train the COVID-CT-Mask-Net lesion segmentation model (Mask R-CNN) on CNCB-layout slices.

Canonical command (the original README's, with the phantom data directories)::

    python train_segmentation.py --num_epochs 100 --mask_type merge --save_every 10 \
        --backbone_name resnet18 --truncation 1 --device cpu \
        --train_data_dir data/phantom/seg/train --val_data_dir data/phantom/seg/test

The run directory (``--save_dir``) receives args.json, env.txt, metrics.jsonl, checkpoint_last.pth,
checkpoint_best.pth (lowest validation loss so far, kept across --resume) and every ``--save_every`` epochs
``<model_name>_ckpt_<epoch>.pth``, all in the project's checkpoint schema.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from datasets.conventions import MASK_TYPE_LABELS, class_names_for, num_detection_classes
from datasets.segmentation import CNCBSegmentationDataset
from models.mask_net import maskrcnn_resnet_fpn
from utils.checkpoint import load_checkpoint, make_checkpoint
from utils.cli import (
    add_device_args,
    add_epoch_args,
    add_optimisation_args,
    add_run_args,
    add_seed_args,
    args_to_dict,
    positive_int,
    probability,
    resolve_device,
    run_cli,
)
from utils.engine import train_one_epoch, validation_loss
from utils.reproducibility import seed_everything, worker_init_fn
from utils.run_dir import RunDir, check_run_dir
from utils.training import current_lr, refuse_distributed, resume_training, run_epochs

BUILDER = "models.mask_net.maskrcnn_resnet_fpn"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--mask_type", default="both", choices=sorted(MASK_TYPE_LABELS),
                   help="both: GGO and consolidation as 2 classes; ggo: GGO only; merge: one lesion class (default: both)")
    add_epoch_args(p, model_name="mrcnn_covid_segmentation_model")
    p.add_argument("--pretrained_model", default=None, help="checkpoint whose model weights initialise training (default: none)")
    p.add_argument("--use_pretrained_resnet_backbone", default=None, metavar="PATH",
                   help="local torchvision ResNet state dict loaded into the backbone; nothing is downloaded (default: none)")
    add_run_args(p, default_save_dir="runs/segmentation")
    p.add_argument("--train_data_dir", default="data/phantom/seg/train", help="training data root (default: data/phantom/seg/train)")
    p.add_argument("--val_data_dir", default="data/phantom/seg/test", help="validation data root (default: data/phantom/seg/test)")
    p.add_argument("--imgs_dir", default="imgs", help="image folder inside each data root (default: imgs)")
    p.add_argument("--gt_dir", default="masks", help="mask folder inside each data root (default: masks)")
    add_optimisation_args(p, batch_size=1, unit="images")
    add_device_args(p)
    add_seed_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model flags shared by the 2D segmentation scripts."""
    p.add_argument("--backbone_name", default="resnet18", choices=["resnet18", "resnet34", "resnet50"],
                   help="backbone (default: resnet18)")
    p.add_argument("--truncation", type=int, default=1, choices=[0, 1, 2],
                   help="ResNet18/34: 0 full, 1 without layer4, 2 without layer3 and layer4; resnet50 takes 0 (default: 1)")
    p.add_argument("--rpn_nms_th", type=probability, default=0.75, help="RPN NMS IoU threshold, train and test (default: 0.75)")
    p.add_argument("--image_size", type=positive_int, default=512,
                   help="short side the model resizes images to; the long side is capped at 2x (default: 512)")


def builder_kwargs_from_args(args: argparse.Namespace, num_classes: int) -> dict:
    """Keyword arguments of :func:`maskrcnn_resnet_fpn` that a checkpoint stores."""
    return {"backbone_name": args.backbone_name, "truncation": args.truncation, "num_classes": num_classes,
            "rpn_nms_thresh": args.rpn_nms_th, "min_size": args.image_size, "max_size": 2 * args.image_size}


def make_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """Training (shuffled) and validation loaders over the CNCB layout."""
    def dataset(root):
        return CNCBSegmentationDataset(root, imgs_dir=args.imgs_dir, masks_dir=args.gt_dir, mask_type=args.mask_type)

    train_set, val_set = dataset(args.train_data_dir), dataset(args.val_data_dir)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=train_set.collate_fn,
                  worker_init_fn=worker_init_fn)
    generator = torch.Generator().manual_seed(args.seed)
    return (DataLoader(train_set, shuffle=True, generator=generator, **common),
            DataLoader(val_set, shuffle=False, **common))


def main(args: argparse.Namespace) -> RunDir:
    refuse_distributed("train_segmentation.py")
    check_run_dir(args.save_dir, resume=bool(args.resume), overwrite=args.overwrite)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    num_classes = num_detection_classes(args.mask_type)
    kwargs = builder_kwargs_from_args(args, num_classes)
    train_loader, val_loader = make_loaders(args)
    model = maskrcnn_resnet_fpn(**kwargs, pretrained_backbone=args.use_pretrained_resnet_backbone)
    if args.pretrained_model:
        ckpt = load_checkpoint(args.pretrained_model, builder=BUILDER, kind="segmentation")
        model.load_state_dict(ckpt["model"], strict=True)
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=args.lrate, weight_decay=args.weight_decay)
    run = RunDir(args.save_dir, args=args_to_dict(args), seed=args.seed, resume=bool(args.resume),
                 overwrite=args.overwrite)
    first_epoch = args.start_epoch
    if args.resume:
        first_epoch, _ = resume_training(args.resume, model=model, optimizer=optimizer, run=run, builder=BUILDER,
                                         kind="segmentation", hyperparameters={"lr": args.lrate,
                                                                               "weight_decay": args.weight_decay})
    train_epochs(args, model=model, optimizer=optimizer, loaders=(train_loader, val_loader), run=run,
                 builder_kwargs=kwargs, first_epoch=first_epoch, device=device)
    return run


def train_epochs(args, *, model, optimizer, loaders, run: RunDir, builder_kwargs: dict, first_epoch: int,
                 device: torch.device) -> None:
    """Epoch loop: train, validation loss, checkpoints, then the metrics line."""
    train_loader, val_loader = loaders
    steps = dict(max_steps=args.max_steps, progress=not args.no_progress)

    def run_epoch(epoch: int) -> dict:
        train = train_one_epoch(model, train_loader, optimizer, device=device, epoch=epoch, **steps)
        val = validation_loss(model, val_loader, device=device, epoch=epoch, **steps)
        print(f"Epoch {epoch}: train loss = {train['loss']:.3f}, validation loss = {val['loss']:.3f}")
        return {**{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
                "lr": current_lr(optimizer)}

    def checkpoint(epoch: int, record: dict) -> dict:
        return make_checkpoint(model=model, optimizer=optimizer, epoch=epoch, args=args_to_dict(args), builder=BUILDER,
                               builder_kwargs=builder_kwargs, mask_type=args.mask_type,
                               class_names=list(class_names_for(args.mask_type)), val_loss=record["val_loss"])

    run_epochs(run=run, epochs=range(first_epoch, args.start_epoch + args.num_epochs), seed=args.seed,
               loader=train_loader, run_epoch=run_epoch, checkpoint=checkpoint,
               periodic=lambda e: f"{args.model_name}_ckpt_{e + 1}.pth" if (e + 1) % args.save_every == 0 else None)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
