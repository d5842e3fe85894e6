"""Shared argparse groups and argument helpers for the project's scripts.

Every flag states its default in ``help``. Scripts follow ``get_args_parser() -> main(args)``.
"""
from __future__ import annotations

import argparse

import torch


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` (cpu|cuda|cuda:N, default cpu)."""
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default: cpu)")


def add_seed_args(parser: argparse.ArgumentParser, default: int = 0) -> None:
    """``--seed`` for :func:`utils.reproducibility.seed_everything`."""
    parser.add_argument("--seed", type=int, default=default, help=f"random seed (default: {default})")


def add_run_args(parser: argparse.ArgumentParser, *, default_save_dir: str) -> None:
    """``--save_dir`` and ``--resume`` for training scripts."""
    group = parser.add_argument_group("run directory")
    group.add_argument("--save_dir", default=default_save_dir,
                       help=f"run directory for args.json, env.txt, metrics.jsonl, checkpoints (default: {default_save_dir})")
    group.add_argument("--resume", default=None,
                       help="checkpoint to resume from: restores model, optimizer and epoch (default: none)")


def add_optimisation_args(parser: argparse.ArgumentParser, *, batch_size: int, unit: str) -> None:
    """``--batch_size --lrate --weight_decay --num_workers --max_steps --no_progress`` of the 2D trainers.

    Args:
        batch_size: the script's default batch size.
        unit: what one batch item is, for the help text ("images", "slices").
    """
    parser.add_argument("--batch_size", type=int, default=batch_size, help=f"{unit} per step (default: {batch_size})")
    parser.add_argument("--lrate", type=float, default=1e-5, help="Adam learning rate (default: 1e-5)")
    parser.add_argument("--weight_decay", type=float, default=1e-3, help="Adam weight decay (default: 1e-3)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="stop each epoch after this many batches, for smoke runs (default: all)")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars (default: shown)")


def resolve_device(name: str) -> torch.device:
    """Turn ``--device`` into a ``torch.device`` and check it is usable.

    Raises:
        ValueError: for a CUDA device when CUDA is not available, or an unknown device string.
    """
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: unknown device {name!r} ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def args_to_dict(args: argparse.Namespace) -> dict:
    """Plain dict of parsed arguments (for args.json and checkpoints)."""
    return {k: (str(v) if not isinstance(v, (bool, int, float, str, list, tuple, type(None))) else v)
            for k, v in vars(args).items()}
