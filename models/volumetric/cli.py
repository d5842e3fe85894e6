"""Command-line flags of the volumetric scripts, each declared once, and their translation into library calls.

The scripts (train_volumetric.py, validate_volumetric.py, infer_volumetric.py, export_bundle.py)
build their parsers from these groups; a default that depends on the task is shown per task, read
from the tasks themselves. Flags that the 2D scripts spell differently are accepted under both
names (``--lr``/``--lrate``, ``--epochs``/``--num_epochs``, ``--workers``/``--num_workers``,
``--output``/``--save_dir``/``--out``).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from models.volumetric import get_task, task_names
from models.volumetric.common import TEST
from models.volumetric.config import BLEND_MODES, CROP_REGIONS
from models.volumetric.trainer import TrainSettings
from utils.cli import args_to_dict, non_negative_int, positive_int
from utils.training import LR_SCHEDULES

NETWORK_FLAGS = ("hidden_size", "mlp_dim", "num_heads", "num_layers", "feature_size")
PRETRAINED_FLAGS = ("pretrained_encoder", "pretrained_2d")
WINDOW_FLAGS = ("overlap", "sw_batch_size", "crop_region", "blend_mode")


def per_task(value: Callable[[Any], Any], *, tasks: tuple[str, ...] | None = None) -> str:
    """``"lung_seg 224 224 32, lesion_seg ..."``: ``value(task)`` of each task that has one (not None)."""
    shown = []
    for name in tasks or task_names():
        got = value(get_task(name))
        if got is not None:
            shown.append(f"{name} {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in _seq(got))}")
    return ", ".join(shown)


def config_default(name: str) -> str:
    """The tasks' defaults of one setting, for a flag's help."""
    return per_task(lambda task: getattr(task.default_config, name, None))


def add_task_arg(parser: argparse.ArgumentParser, *, choices: tuple[str, ...] | None = None,
                 help: str = "task the checkpoint was trained for (required)") -> None:
    """``--task``, one of the registered tasks (or ``choices``)."""
    parser.add_argument("--task", required=True, choices=choices or task_names(), help=help)


def add_checkpoint_arg(parser: argparse.ArgumentParser) -> None:
    """``--ckpt``, a checkpoint written by train_volumetric.py."""
    parser.add_argument("--ckpt", required=True, help="checkpoint from train_volumetric.py (required)")


def add_datalist_args(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--datalist`` (required) and ``--data_root``."""
    parser.add_argument("--datalist", required=True, help=f"dataset.json {what} (required)")
    add_data_root_arg(parser, what="the datalist's paths are relative to")


def add_data_root_arg(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--data_root``: where a datalist's relative paths start."""
    parser.add_argument("--data_root", default=None, help=f"folder {what} (default: the datalist's folder)")


def add_section_arg(parser: argparse.ArgumentParser, *, default: str, what: str) -> None:
    """``--section`` of a datalist; ``test`` and ``testing`` name one section."""
    also = " (or 'testing', whichever the file has)" if default == TEST else ""
    parser.add_argument("--section", default=default, help=f"datalist section {what} (default: {default}{also})")


def add_output_arg(parser: argparse.ArgumentParser, *, dest: str, required: bool, help: str) -> None:
    """The output folder as ``--output``, ``--save_dir`` or ``--out`` (one flag, three names; ``dest`` first)."""
    names = sorted(("--output", "--save_dir", "--out"), key=lambda n: n != f"--{dest}")
    parser.add_argument(*names, dest=dest, required=required, default=None, help=help)


def add_epochs_arg(parser: argparse.ArgumentParser) -> None:
    """``--epochs`` (alias ``--num_epochs``): the epoch count at which the run ends."""
    parser.add_argument("--epochs", "--num_epochs", dest="epochs", type=positive_int, default=100,
                        help="the run ends after this many epochs in total, and a resumed run continues to it: the "
                             "2D --num_epochs with its default --start_epoch 0 (default: 100)")


def add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    """``--lr`` (alias ``--lrate``), ``--lr_schedule``, ``--warmup_epochs``, ``--batch_size``, ``--cache_rate``,
    ``--workers`` (alias ``--num_workers``)."""
    parser.add_argument("--lr", "--lrate", dest="lr", type=float, default=None,
                        help=f"Adam learning rate (default: the task's, {per_task(lambda t: t.default_lr)})")
    parser.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                        help="learning rate per epoch: constant, cosine (to zero after the last epoch) or step (x0.1 "
                             "from 75%% and again from 90%% of the epochs) (default: constant)")
    parser.add_argument("--warmup_epochs", type=non_negative_int, default=0,
                        help="multiply the lr of the first N epochs by a linear ramp from 0.001 to 1 (default: 0)")
    parser.add_argument("--batch_size", type=positive_int, default=2, help="crops per step and process (default: 2)")
    parser.add_argument("--cache_rate", type=float, default=1.0,
                        help="fraction of pre-processed cases kept in memory (default: 1.0)")
    parser.add_argument("--workers", "--num_workers", dest="workers", type=non_negative_int, default=0,
                        help="DataLoader worker processes (default: 0)")


def add_preprocessing_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """ROI, spacing, HU window, --strict_hu; None keeps the task's default. Returns the group."""
    group = parser.add_argument_group("pre-processing and sliding window (default: the task's)")
    group.add_argument("--roi_size", type=int, nargs=3, default=None,
                       help=f"crop / window size x y z in voxels (default: {config_default('roi_size')})")
    group.add_argument("--spacing", type=float, nargs=3, default=None,
                       help=f"voxel size x y z in mm (default: {config_default('spacing')})")
    group.add_argument("--hu_window", type=float, nargs=2, default=None,
                       help=f"HU clip range (default: {config_default('hu_window')})")
    group.add_argument("--strict_hu", action="store_true",
                       help="refuse volumes that do not look like HU instead of warning (default: warn)")
    return group


def add_window_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, default: str) -> None:
    """Sliding-window flags; None keeps ``default`` ("the task's" or "the checkpoint's")."""
    parser.add_argument("--overlap", type=float, nargs="+", default=None,
                        help=f"window overlap, one value or x y z (default: {default}, {config_default('overlap')})")
    parser.add_argument("--sw_batch_size", type=int, default=None,
                        help=f"windows per network call (default: {default}, {config_default('sw_batch_size')})")
    parser.add_argument("--crop_region", choices=CROP_REGIONS, default=None,
                        help=f"region the windows cover, background elsewhere (default: {default}, "
                             f"{config_default('crop_region')})")
    parser.add_argument("--blend_mode", choices=BLEND_MODES, default=None,
                        help=f"blending of overlapping windows; constant is MONAI's default (default: {default}, "
                             f"{config_default('blend_mode')})")


def add_network_args(parser: argparse.ArgumentParser) -> None:
    """Task-specific pre-processing, network-size and pre-trained-weights flags; None keeps the task's default."""
    group = parser.add_argument_group("task-specific settings (default: the task's)")
    masking = group.add_mutually_exclusive_group()
    masking.add_argument("--mask_intensity", action="store_const", const=True, default=None,
                         help="covid_cls: set voxels outside the lung mask to zero (the default)")
    masking.add_argument("--no_mask_intensity", dest="mask_intensity", action="store_const", const=False,
                         help="covid_cls: keep the tissue outside the lung, as the released Clara model")
    group.add_argument("--mask_erosion_mm", type=float, default=None,
                       help="covid_cls: shrink the lung mask by this many mm before masking; 0 keeps it (default: 1.5)")
    group.add_argument("--crop_margin", type=int, nargs=3, default=None,
                       help="covid_cls: voxels kept around the lung box x y z (default: 10 10 2)")
    for name, text in (("hidden_size", "ViT token width"), ("mlp_dim", "ViT MLP width"),
                       ("num_heads", "ViT attention heads"), ("num_layers", "ViT blocks; UNETR reads 12"),
                       ("feature_size", "UNETR decoder width")):
        shown = per_task(lambda t, n=name: t.network_kwargs.get(n))
        group.add_argument(f"--{name}", type=int, default=None, help=f"{text} (default: {shown})")
    for name in PRETRAINED_FLAGS:
        tasks = [n for n in task_names() if name in get_task(n).pretrained]
        group.add_argument(f"--{name}", default=None,
                           help=f"{', '.join(tasks)}: {_PRETRAINED_HELP[name]} (default: none)")


_PRETRAINED_HELP = {
    "pretrained_encoder": "ssl_pretrain checkpoint whose ViT weights initialise UNETR's encoder",
    "pretrained_2d": "local torchvision ResNet50 state dict for AH-Net's encoder",
}


def window_overrides(args: argparse.Namespace) -> dict:
    """The sliding-window flags that were given, as config settings (one overlap value stays one)."""
    overlap = args.overlap[0] if args.overlap and len(args.overlap) == 1 else args.overlap
    return {"overlap": overlap, "sw_batch_size": args.sw_batch_size, "crop_region": args.crop_region,
            "blend_mode": args.blend_mode}


def config_overrides(args: argparse.Namespace) -> dict:
    """The config flags that were given, as :meth:`Task.make_config` keywords."""
    task_flags = {"mask_intensity": args.mask_intensity, "mask_erosion_mm": args.mask_erosion_mm,
                  "crop_margin": args.crop_margin}
    return {"roi_size": args.roi_size, "spacing": args.spacing, "hu_window": args.hu_window, **window_overrides(args),
            "strict_hu": True if args.strict_hu else None, **{k: v for k, v in task_flags.items() if v is not None}}


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The :class:`TrainSettings` of train_volumetric.py's parsed arguments."""
    return TrainSettings(
        task=args.task, datalist=args.datalist, save_dir=args.save_dir, data_root=args.data_root, epochs=args.epochs,
        lr=args.lr, lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
        cache_rate=args.cache_rate,
        workers=args.workers,
        val_every=args.val_every, progress=not args.no_progress, amp=args.amp, device=args.device, seed=args.seed,
        resume=args.resume, overwrite=args.overwrite, config=config_overrides(args),
        network={k: getattr(args, k) for k in NETWORK_FLAGS if getattr(args, k) is not None},
        pretrained={k: getattr(args, k) for k in PRETRAINED_FLAGS if getattr(args, k) is not None},
        record=args_to_dict(args))


def _seq(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
