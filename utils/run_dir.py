"""The run directory of DESIGN.md: args.json, env.txt, metrics.jsonl and checkpoints."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from utils.checkpoint import save_checkpoint


class RunDir:
    """One training run's folder.

    Layout::

        save_dir/args.json  env.txt  metrics.jsonl  checkpoint_last.pth  checkpoint_best.pth
    """

    def __init__(self, save_dir: str | Path, *, args: dict, seed: int | None = None, resume: bool = False):
        """Create the folder and write ``args.json`` and ``env.txt``.

        A new run (``resume`` False) in a folder used before starts ``metrics.jsonl`` afresh, as it
        overwrites the checkpoints; a resumed run appends to it.
        """
        self.path = Path(save_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            (self.path / "metrics.jsonl").unlink(missing_ok=True)
        (self.path / "args.json").write_text(json.dumps(args, indent=2, sort_keys=True, default=str) + "\n")
        (self.path / "env.txt").write_text(environment_report(seed=seed))
        self.best_value: float | None = None

    @property
    def last(self) -> Path:
        return self.path / "checkpoint_last.pth"

    @property
    def best(self) -> Path:
        return self.path / "checkpoint_best.pth"

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line (one epoch) to ``metrics.jsonl``."""
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    def save(self, checkpoint: dict, *, value: float | None = None, higher_is_better: bool = True,
             extra_name: str | None = None) -> bool:
        """Save ``checkpoint_last.pth``; also ``checkpoint_best.pth`` when ``value`` improves.

        Args:
            checkpoint: a dict from :func:`utils.checkpoint.make_checkpoint`.
            value: the selection metric of this epoch (None: best follows last).
            higher_is_better: direction of ``value``.
            extra_name: also save under this file name (e.g. a periodic ``model_e10.pth``).

        Returns:
            True when this checkpoint became the best one.
        """
        save_checkpoint(checkpoint, self.last)
        if extra_name:
            save_checkpoint(checkpoint, self.path / extra_name)
        improved = value is None or self.best_value is None or (
            value > self.best_value if higher_is_better else value < self.best_value)
        if improved:
            self.best_value = value
            save_checkpoint(checkpoint, self.best)
        return improved


def environment_report(*, seed: int | None = None) -> str:
    """Versions, git commit and seed as ``key: value`` lines."""
    import monai
    import numpy
    import torchvision

    lines = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
        "seed": seed,
    }
    return "".join(f"{k}: {v}\n" for k, v in lines.items())


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
