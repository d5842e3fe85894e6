"""Shared argparse groups and argument helpers for the project's scripts.

Every flag states its default in ``help``. Scripts follow ``get_args_parser() -> main(args)``.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import MISSING, fields
from typing import Any

import torch


def positive_int(text: str) -> int:
    """argparse ``type`` for an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type`` for an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def probability(text: str) -> float:
    """argparse ``type`` for a float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def add_output_args(parser: argparse.ArgumentParser, *, default: str, what: str) -> None:
    """``--save_dir`` (aliases ``--output``, ``--out``): the folder a script writes ``what`` into."""
    parser.add_argument("--save_dir", "--output", "--out", dest="save_dir", default=default,
                        help=f"output folder for {what} (default: {default})")


def add_workers_args(parser: argparse.ArgumentParser) -> None:
    """``--num_workers`` (alias ``--workers``) and ``--no_progress``."""
    parser.add_argument("--num_workers", "--workers", dest="num_workers", type=non_negative_int, default=0,
                        help="DataLoader worker processes (default: 0)")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars (default: shown)")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` (cpu|cuda|cuda:N, default cpu)."""
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default: cpu)")


def add_amp_arg(parser: argparse.ArgumentParser, *, inference: bool = False) -> None:
    """``--amp``: mixed precision (:mod:`utils.amp`), for training or (``inference``) for running a model."""
    how = ("float16 on older GPUs; meant for GPUs: bfloat16 can be slower than float32 on a CPU" if inference
           else "float16 with loss scaling on older GPUs")
    parser.add_argument("--amp", action="store_true",
                        help=f"mixed precision: bfloat16 on CPU and on GPUs that have it, {how} (default: off)")


def add_seed_args(parser: argparse.ArgumentParser, default: int = 0) -> None:
    """``--seed`` for :func:`utils.reproducibility.seed_everything`."""
    parser.add_argument("--seed", type=int, default=default, help=f"random seed (default: {default})")


def add_run_args(parser: argparse.ArgumentParser, *, default_save_dir: str) -> None:
    """``--save_dir`` (aliases ``--output``, ``--out``), ``--resume`` and ``--overwrite`` of the training scripts."""
    group = parser.add_argument_group("run directory")
    add_output_args(group, default=default_save_dir, what="args.json, env.txt, metrics.jsonl and checkpoints")
    group.add_argument("--resume", default=None,
                       help="checkpoint to resume from: restores model, optimizer, epoch, RNG states and the best "
                            "value so far; metrics.jsonl is appended to (default: none)")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run in a --save_dir that holds one, moving its files to "
                            "<save_dir>/previous-<timestamp>/ (default: refuse a non-empty --save_dir)")


def add_optimisation_args(parser: argparse.ArgumentParser, *, batch_size: int, unit: str) -> None:
    """``--batch_size --lrate --weight_decay --optimizer --lr_schedule --warmup_steps --num_workers
    --max_steps --no_progress --sync_bn`` of the 2D trainers.

    ``--lr`` is an alias of ``--lrate`` and ``--workers`` of ``--num_workers`` (the 3D track's names).

    Args:
        batch_size: the script's default batch size.
        unit: what one batch item is, for the help text ("images", "slices").
    """
    parser.add_argument("--batch_size", type=positive_int, default=batch_size,
                        help=f"{unit} per step and process: under torchrun a step sees batch_size x the number of "
                             f"processes (default: {batch_size})")
    parser.add_argument("--lrate", "--lr", dest="lrate", type=float, default=1e-5,
                        help="base learning rate (default: 1e-5)")
    parser.add_argument("--weight_decay", type=float, default=1e-3, help="weight decay (L2) (default: 1e-3)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="adam, or sgd with momentum 0.9 (default: adam)")
    parser.add_argument("--lr_schedule", choices=("constant", "cosine", "step"), default="constant",
                        help="learning rate over the run: constant, cosine (to zero at the last epoch) or step "
                             "(x0.1 at 75%% and 90%% of the steps) (default: constant)")
    parser.add_argument("--warmup_steps", type=non_negative_int, default=0,
                        help="optimizer steps over which the learning rate rises linearly to --lrate (default: 0)")
    parser.add_argument("--max_steps", type=positive_int, default=None,
                        help="stop each epoch after this many batches, for smoke runs (default: all)")
    add_workers_args(parser)
    parser.add_argument("--sync_bn", action="store_true",
                        help="under torchrun on GPUs, synchronise the batch statistics of the BatchNorm layers that "
                             "train on them across the processes (SyncBatchNorm); off, each process normalises "
                             "with its own batch's, as the original did on each GPU (default: off)")


def add_epoch_args(parser: argparse.ArgumentParser, *, model_name: str) -> None:
    """``--num_epochs`` (alias ``--epochs``) ``--start_epoch --save_every --model_name`` of the 2D trainers.

    ``--epochs`` means what it means in the 3D track: the run ends after this many epochs in total.
    """
    parser.add_argument("--num_epochs", "--epochs", dest="num_epochs", type=positive_int, default=50,
                        help="the run ends after this many epochs in total, counted from --start_epoch; a resumed run "
                             "continues to that same end (default: 50)")
    parser.add_argument("--start_epoch", type=non_negative_int, default=0,
                        help="number of the first epoch of a new run; it ends at start_epoch + num_epochs (default: 0)")
    parser.add_argument("--save_every", type=positive_int, default=10,
                        help="also save <model_name>_ckpt_<epoch>.pth every N epochs (default: 10)")
    parser.add_argument("--model_name", default=model_name,
                        help=f"name used in periodic checkpoint files (default: {model_name})")


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


def args_to_dict(args: argparse.Namespace | dict) -> dict:
    """Plain dict of parsed arguments or settings (for args.json and checkpoints)."""
    items = args.items() if isinstance(args, dict) else vars(args).items()
    return {k: (str(v) if not isinstance(v, (bool, int, float, str, list, tuple, type(None))) else v) for k, v in items}


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """The dataclass ``config_class`` with each field taken from the parsed ``args`` of the same name.

    Raises:
        AttributeError: naming a field the parser does not define.
    """
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


def dataclass_defaults(config_class: type) -> dict:
    """Field name -> default of the dataclass ``config_class`` (fields without a default left out)."""
    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


# Exceptions that mean "the input or a flag is wrong": one line, no traceback (``--debug`` shows it).
# ChildProcessError: a step of a pipeline script failed (its own message was shown already).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, ChildProcessError)


def run_cli(main, parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse ``argv`` and call ``main(args)``; a user error prints one line and exits 1.

    Adds ``--debug`` to ``parser``. Programming errors (TypeError, KeyError, ...) print their traceback,
    and so does a user error under ``--debug``; both exit 1.

    Returns:
        What ``main`` returned.
    """
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: off)")
    args = parser.parse_args(argv)
    try:
        return main(args)
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: {err}", file=sys.stderr, flush=True)
        _exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        _exit(130)
    except Exception:
        traceback.print_exc()
        _exit(1)


def _exit(code: int) -> None:
    """Flush stdout and stderr, then exit with ``code`` without the interpreter's teardown.

    An error raised while MONAI's CacheDataset filled its cache in a worker thread leaves that thread's
    state referenced by the traceback; tearing the interpreter down then aborts the process (SIGABRT,
    exit 134, "terminate called without an active exception") after the message was shown. Every file
    the project writes is closed by its ``with`` block before an error can reach this point.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
