"""Train a volumetric (3D, MONAI) task: lung_seg (AH-Net), lesion_seg (SegResNet), covid_cls
(DenseNet121), ssl_pretrain (ViTAutoEnc) or organ_seg (UNETR).

Canonical command::

    python train_volumetric.py --task lesion_seg --datalist data/phantom/volumes/dataset_lesion.json \\
        --data_root data/phantom/volumes --epochs 100 --save_dir runs/lesion_seg

Several processes (GPUs or CPU processes, one or more nodes) with DistributedDataParallel::

    torchrun --nproc_per_node 2 train_volumetric.py --task lung_seg --datalist dataset.json ...

The datalist's ``training`` section is trained on and its ``validation`` section selects
``checkpoint_best.pth`` by mean sliding-window Dice. The run directory holds args.json, env.txt,
metrics.jsonl and the checkpoints; a checkpoint also stores the task's pre-processing settings, so
validate_volumetric.py and infer_volumetric.py need no pre-processing flags.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.volumetric import get_task, task_names, task_stage
from models.volumetric.common import BLEND_MODES, CROP_REGIONS, load_cases
from models.volumetric.engine import (
    cleanup_distributed,
    evaluate_dice,
    make_datasets,
    make_train_loader,
    setup_distributed,
    train_one_epoch,
)
from utils.checkpoint import make_checkpoint
from utils.cli import (
    add_device_args,
    add_run_args,
    add_seed_args,
    args_to_dict,
    non_negative_int,
    positive_int,
    resolve_device,
    run_cli,
)
from utils.reproducibility import rng_state, seed_epoch, seed_everything
from utils.run_dir import Best, RunDir, check_run_dir
from utils.training import current_lr, resume_training


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=task_names(), help="volumetric task (required)")
    parser.add_argument("--datalist", required=True, help="dataset.json with 'training' and 'validation' sections (required)")
    parser.add_argument("--data_root", default=None, help="folder the datalist paths are relative to (default: the datalist's folder)")
    parser.add_argument("--epochs", type=positive_int, default=100,
                        help="train up to this epoch count; a resumed run continues to it (default: 100)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the task's, 1e-4 lung_seg, 1e-3 lesion_seg, 5e-6 covid_cls, 1e-4 ssl_pretrain and organ_seg)")
    parser.add_argument("--batch_size", type=positive_int, default=2, help="crops per step and process (default: 2)")
    parser.add_argument("--cache_rate", type=float, default=1.0, help="fraction of pre-processed cases kept in memory (default: 1.0)")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default: 0)")
    parser.add_argument("--val_every", type=positive_int, default=1, help="validate every N epochs and at the last one (default: 1)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar (default: shown)")
    parser.add_argument("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on CPU (default: off)")
    parser.add_argument("--pretrained_2d", default=None, help="lung_seg only: local torchvision ResNet50 state dict for AH-Net's encoder (default: none)")
    parser.add_argument("--pretrained_encoder", default=None, help="organ_seg only: ssl_pretrain checkpoint whose ViT weights initialise UNETR's encoder (default: none)")
    add_network_args(parser)
    add_config_args(parser)
    add_device_args(parser)
    add_seed_args(parser)
    add_run_args(parser, default_save_dir="runs/volumetric")
    return parser


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Pre-processing and sliding-window flags; None keeps the task's default."""
    group = parser.add_argument_group("pre-processing and sliding window (default: the task's)")
    group.add_argument("--roi_size", type=int, nargs=3, default=None, help="crop / window size x y z in voxels (default: 224 224 32)")
    group.add_argument("--spacing", type=float, nargs=3, default=None, help="voxel size x y z in mm (default: 0.8 0.8 5)")
    group.add_argument("--hu_window", type=float, nargs=2, default=None, help="HU clip range (default: -1500 500 lung_seg, -1000 500 lesion_seg)")
    group.add_argument("--overlap", type=float, nargs="+", default=None, help="window overlap, one value or x y z (default: 0.25)")
    group.add_argument("--sw_batch_size", type=int, default=None, help="windows per network call (default: 4)")
    group.add_argument("--crop_region", choices=CROP_REGIONS, default=None,
                       help="region the windows cover, background elsewhere (default: the task's, body for lung_seg, lung for lesion_seg)")
    group.add_argument("--blend_mode", choices=BLEND_MODES, default=None,
                       help="blending of overlapping windows at validation and inference (default: gaussian)")
    group.add_argument("--strict_hu", action="store_true", help="refuse volumes that do not look like HU instead of warning (default: warn)")


def add_network_args(parser: argparse.ArgumentParser) -> None:
    """Task-specific pre-processing and network-size flags; None keeps the task's default."""
    group = parser.add_argument_group("covid_cls, ssl_pretrain, organ_seg (default: the task's)")
    group.add_argument("--mask_intensity", action="store_true", help="covid_cls: set voxels outside the lung mask to zero (default: off, as the released model)")
    group.add_argument("--crop_margin", type=int, nargs=3, default=None, help="covid_cls: voxels kept around the lung box x y z (default: 10 10 2)")
    group.add_argument("--hidden_size", type=int, default=None, help="ssl_pretrain/organ_seg: ViT token width (default: 768)")
    group.add_argument("--mlp_dim", type=int, default=None, help="ssl_pretrain/organ_seg: ViT MLP width (default: 3072)")
    group.add_argument("--num_heads", type=int, default=None, help="ssl_pretrain/organ_seg: ViT attention heads (default: 12)")
    group.add_argument("--num_layers", type=int, default=None, help="ssl_pretrain: ViT blocks; UNETR reads 12 (default: 12)")
    group.add_argument("--feature_size", type=int, default=None, help="organ_seg: UNETR decoder width (default: 16)")


def network_overrides(task, config, args: argparse.Namespace) -> dict:
    """Builder keywords given on the command line; a ViT's ``img_size`` follows ``roi_size``."""
    given = {k: getattr(args, k) for k in ("hidden_size", "mlp_dim", "num_heads", "num_layers", "feature_size")}
    unknown = sorted(k for k, v in given.items() if v is not None and k not in task.network_kwargs)
    if unknown:
        raise ValueError(f"--{', --'.join(unknown)} do not apply to task {task.name}")
    sizes = {"img_size": list(config.roi_size)} if "img_size" in task.network_kwargs else {}
    return {**sizes, **{k: v for k, v in given.items() if v is not None}}


def config_overrides(args: argparse.Namespace) -> dict:
    """The config flags that were given, as :meth:`Task.make_config` keywords."""
    overlap = args.overlap[0] if args.overlap and len(args.overlap) == 1 else args.overlap
    return {"roi_size": args.roi_size, "spacing": args.spacing, "hu_window": args.hu_window, "overlap": overlap,
            "sw_batch_size": args.sw_batch_size, "crop_region": args.crop_region,
            "blend_mode": args.blend_mode,
            "strict_hu": True if args.strict_hu else None, **_task_config_overrides(args)}


def _task_config_overrides(args: argparse.Namespace) -> dict:
    given = {"mask_intensity": True if args.mask_intensity else None, "crop_margin": args.crop_margin}
    return {k: v for k, v in given.items() if v is not None}


def build_model(task, args: argparse.Namespace, config=None) -> tuple[torch.nn.Module, dict]:
    """The task's network, optionally with AH-Net's encoder from a 2D ResNet50 or UNETR's from ssl_pretrain."""
    model, kwargs = task.build_network(**(network_overrides(task, config, args) if config is not None else {}))
    if args.pretrained_encoder:
        if task.name != "organ_seg":
            raise ValueError(f"--pretrained_encoder applies to organ_seg (UNETR) only, not {task.name}")
        from models.volumetric.organ_seg import load_pretrained_encoder

        report = load_pretrained_encoder(model, args.pretrained_encoder)
        print(f"pretrained encoder: loaded {report['loaded']}/{report['expected']} ViT keys from {args.pretrained_encoder}")
    if args.pretrained_2d:
        if task.name != "lung_seg":
            raise ValueError(f"--pretrained_2d applies to lung_seg (AH-Net) only, not {task.name}")
        from models.volumetric.lung_seg import transfer_from_resnet50

        transfer_from_resnet50(model, args.pretrained_2d)
    return model, kwargs


def resume(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: RunDir | None, task,
           lr: float) -> int:
    """Restore model, optimizer, RNG states and best-so-far value; returns the first epoch to run."""
    start, ckpt = resume_training(path, model=model, optimizer=optimizer, run=run_dir, builder=task.builder,
                                  kind=f"{task.name} training", hyperparameters={"lr": lr})
    if ckpt.get("task") != task.name:
        raise ValueError(f"--resume {path}: checkpoint is for task {ckpt.get('task')!r}, not {task.name!r}")
    return start


def main(args: argparse.Namespace) -> dict:
    """Train; returns the last epoch's metrics record (on every rank)."""
    check_run_dir(args.save_dir, resume=bool(args.resume), overwrite=args.overwrite)
    ctx = setup_distributed(resolve_device(args.device))
    try:
        return train(args, ctx)
    finally:
        cleanup_distributed(ctx)


def train(args: argparse.Namespace, ctx) -> dict:
    seed_everything(args.seed + ctx.rank)
    task = get_task(args.task)
    config = task.make_config(**config_overrides(args))
    train_set, val_set = _datasets(args, task, config)
    loader = make_train_loader(train_set, batch_size=args.batch_size, ctx=ctx, seed=args.seed, num_workers=args.workers)
    model, kwargs = build_model(task, args, config)
    lr = args.lr or task.default_lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    metric, higher = task_stage(task, "SELECTION_METRIC", ("dice", True))
    run_dir = RunDir(args.save_dir, args=args_to_dict(args), seed=args.seed, resume=bool(args.resume),
                     overwrite=args.overwrite, best=Best(f"val_{metric}", higher)) if ctx.is_main else None
    start = resume(args.resume, model=model, optimizer=optimizer, run_dir=run_dir, task=task, lr=lr) if args.resume else 0
    model.to(ctx.device)
    net = DistributedDataParallel(model) if ctx.distributed else model
    scaler = torch.amp.GradScaler("cuda") if args.amp and ctx.device.type == "cuda" else None
    record: dict = {}
    for epoch in range(start, args.epochs):
        seed_epoch(args.seed, epoch, rank=ctx.rank, generator=loader.generator, dataset=train_set)
        if ctx.distributed:
            loader.sampler.set_epoch(epoch)
        loss = task_stage(task, "train_one_epoch", train_one_epoch)(
            net, loader, optimizer=optimizer, loss_fn=task.loss(), device=ctx.device, scaler=scaler, amp=args.amp,
            progress=ctx.is_main and not args.no_progress, desc=f"epoch {epoch}")
        losses = loss if isinstance(loss, dict) else {"loss": loss}  # ssl_pretrain logs its terms too
        record = {"epoch": epoch, **{f"train_{k}": _mean_over_ranks(v, ctx) for k, v in losses.items()},
                  "lr": current_lr(optimizer), "world_size": ctx.world_size}
        if run_dir is not None:
            record = _end_epoch(args, record, model, optimizer, task, config, kwargs, val_set, run_dir, ctx)
        if ctx.distributed:
            dist.barrier()
    return record


def _datasets(args: argparse.Namespace, task, config):
    """Training and validation datasets from the datalist's two sections."""
    train_cases = load_cases(args.datalist, data_root=args.data_root, section="training")
    val_cases = load_cases(args.datalist, data_root=args.data_root, section="validation")
    if not train_cases or not val_cases:
        raise ValueError(f"{args.datalist}: needs cases in both 'training' and 'validation' sections, "
                         f"got {len(train_cases)} and {len(val_cases)}")
    return make_datasets(task, config, train_cases=train_cases, val_cases=val_cases, cache_rate=args.cache_rate)


def _end_epoch(args, record: dict, model, optimizer, task, config, kwargs, val_set, run_dir: RunDir, ctx) -> dict:
    """Rank 0: validate when due, save last (and best when the selection metric improved), then log.

    The selection metric is validation Dice unless the task's module names another
    (``SELECTION_METRIC = (name, higher_is_better)``, e.g. AUC for covid_cls).
    """
    epoch = record["epoch"]
    if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
        result = task_stage(task, "evaluate", evaluate_dice)(model, val_set, task=task, config=config,
                                                             device=ctx.device, amp=args.amp)
        record.update({f"val_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    ckpt = make_checkpoint(model=model, builder=task.builder, builder_kwargs=kwargs, epoch=epoch,
                           args=args_to_dict(args), optimizer=optimizer, task=task.name,
                           task_config=config.to_dict(), metrics=dict(record))
    ckpt["rng_state"] = rng_state()
    record["best"] = run_dir.end_epoch(ckpt, record)
    print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in record.items() if k != "epoch"), flush=True)
    return record


def _mean_over_ranks(value: float, ctx) -> float:
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world_size


if __name__ == "__main__":
    run_cli(main, get_args_parser())
