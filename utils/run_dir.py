"""The run directory: args.json, env.txt, metrics.jsonl and checkpoints, kept safe across runs.

What a run directory guarantees (the README's "What is safe"):

* A new run never overwrites an old one: a non-empty ``save_dir`` is refused unless the run resumes
  (``--resume``) or ``--overwrite`` is given, and then the old files are moved to
  ``save_dir/previous-<timestamp>/``, never deleted.
* An epoch's ``metrics.jsonl`` line is written only after its checkpoints, so a run killed at any
  moment and resumed logs every epoch exactly once.
* The best-so-far value of the selection metric and its epoch travel in every checkpoint and are
  restored on resume, so ``checkpoint_best.pth`` is only ever replaced by a better model.
* Partial checkpoint writes (``.*.pth.*.tmp``) of a killed run are removed when the folder is opened.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from utils.checkpoint import remove_stale_temporaries, save_checkpoint

PREVIOUS_PREFIX = "previous-"


@dataclass
class Best:
    """The best value so far of a selection metric, and the epoch that reached it.

    Attributes:
        metric: name of the metric in ``metrics.jsonl`` (e.g. ``val_loss``).
        higher_is_better: direction of the metric.
        value: best value so far, None before the first evaluation.
        epoch: epoch of ``value``, None before the first evaluation.
        tie_metric: a second metric that decides between epochs with equal ``metric`` values (e.g. a
            classifier's validation log loss when its AUC is 1.0 at several epochs); None: a tie
            goes to the later epoch.
        tie_higher_is_better: direction of ``tie_metric``.
        tie_value: ``tie_metric`` at ``epoch``.
    """

    metric: str
    higher_is_better: bool
    value: float | None = None
    epoch: int | None = None
    tie_metric: str | None = None
    tie_higher_is_better: bool = False
    tie_value: float | None = None

    def improves(self, value: float, tie: float | None = None) -> bool:
        """True when ``value`` is at least as good as the best so far (a NaN never is).

        A tie goes to the better ``tie`` value when there is a ``tie_metric`` and both epochs have a
        value of it; otherwise to the later, longer-trained epoch: while a briefly trained detector's
        mask mAP is still 0 every epoch, the best checkpoint follows training instead of staying at
        epoch 0.
        """
        if value is None or math.isnan(value):
            return False
        if self.value is None:
            return True
        if value != self.value:
            return value > self.value if self.higher_is_better else value < self.value
        if self.tie_metric is None or not _finite(tie) or not _finite(self.tie_value):
            return True
        return tie >= self.tie_value if self.tie_higher_is_better else tie <= self.tie_value

    def update(self, value: float, epoch: int, tie: float | None = None) -> bool:
        """Take ``value`` (and ``tie``) of ``epoch`` when it improves; returns whether it did."""
        if not self.improves(value, tie):
            return False
        self.value, self.epoch = float(value), int(epoch)
        self.tie_value = float(tie) if _finite(tie) else None
        return True

    def to_dict(self) -> dict:
        """The checkpoint's ``best`` entry; the tie fields only when there is a tie metric."""
        stored = asdict(self)
        if self.tie_metric is None:
            for key in ("tie_metric", "tie_higher_is_better", "tie_value"):
                stored.pop(key)
        return stored


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def check_run_dir(save_dir: str | Path, *, resume: bool, overwrite: bool = False) -> None:
    """Refuse a non-empty ``save_dir`` for a new run (call it before any work is done).

    Raises:
        FileExistsError: naming the folder and what it holds, when it is not empty and the run
            neither resumes nor may overwrite.
        NotADirectoryError: when ``save_dir`` is a file.
    """
    path = Path(save_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--save_dir {path} is a file, not a folder")
    held = _contents(path)
    if held and not resume and not overwrite:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise FileExistsError(f"--save_dir {path} already holds a run ({shown}); pass --resume "
                              f"{path / 'checkpoint_last.pth'} to continue it, --overwrite to move the old files "
                              f"to {path / (PREVIOUS_PREFIX + '<timestamp>')}/, or choose another --save_dir")


class RunDir:
    """One training run's folder.

    Layout::

        save_dir/args.json  env.txt  metrics.jsonl  checkpoint_last.pth  checkpoint_best.pth
    """

    def __init__(self, save_dir: str | Path, *, args: dict, seed: int | None = None, resume: bool = False,
                 overwrite: bool = False, best: Best | None = None):
        """Open the folder for this run and write ``args.json`` and ``env.txt``.

        Args:
            save_dir: the run directory (created if missing).
            args: the run's arguments, written to ``args.json``.
            seed: recorded in ``env.txt``.
            resume: continue a run: ``metrics.jsonl`` is appended to.
            overwrite: a new run in a used folder: the old files move to ``previous-<timestamp>/``.
            best: the selection metric (default: ``val_loss``, lower is better).

        Raises:
            FileExistsError: for a new run in a non-empty folder without ``overwrite``.
        """
        check_run_dir(save_dir, resume=resume, overwrite=overwrite)
        self.path = Path(save_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume and _contents(self.path):
            moved = move_aside(self.path)
            print(f"--overwrite: the previous run's files moved to {moved}")
        remove_stale_temporaries(self.path)
        (self.path / "args.json").write_text(json.dumps(args, indent=2, sort_keys=True, default=str) + "\n")
        (self.path / "env.txt").write_text(environment_report(seed=seed))
        self.best = best or Best("val_loss", higher_is_better=False)

    @property
    def best_value(self) -> float | None:
        return self.best.value

    @property
    def last(self) -> Path:
        return self.path / "checkpoint_last.pth"

    @property
    def best_path(self) -> Path:
        return self.path / "checkpoint_best.pth"

    def restore_best(self, checkpoint: dict) -> None:
        """Take the best-so-far value and epoch stored in a checkpoint this run resumes from.

        When the checkpoint chose its best model by another metric (a run started before the selection
        metric changed), the values cannot be compared: ``checkpoint_best.pth`` is kept as
        ``checkpoint_best_by_<metric>.pth`` and this run's metric starts afresh.
        """
        stored = checkpoint.get("best")
        if not stored:
            return
        if stored["metric"] == self.best.metric:  # this run's tie-break; the stored tie value only when it is of it
            tie = stored.get("tie_value") if stored.get("tie_metric") == self.best.tie_metric else None
            self.best = Best(**{**stored, "tie_metric": self.best.tie_metric,
                                "tie_higher_is_better": self.best.tie_higher_is_better, "tie_value": tie})
            return
        kept = self.path / f"checkpoint_best_by_{stored['metric']}.pth"
        if self.best_path.exists():
            self.best_path.replace(kept)
        print(f"the resumed run chose its best model by {stored['metric']}, this run chooses by {self.best.metric}: "
              f"the earlier best is kept as {kept}")

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line (one epoch) to ``metrics.jsonl``."""
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    def end_epoch(self, checkpoint: dict, record: dict, *, extra_name: str | None = None) -> bool:
        """Save the epoch's checkpoints, then log its metrics line (in that order, for crash safety).

        The selection metric is read from ``record[self.best.metric]``; when the record has none (an
        epoch without validation) only ``checkpoint_last.pth`` is written. ``checkpoint`` receives the
        up-to-date ``best`` entry, and ``record`` a ``best`` flag.

        Args:
            checkpoint: a dict from :func:`utils.checkpoint.make_checkpoint`.
            record: the epoch's metrics line; must hold ``epoch``.
            extra_name: also save under this file name (e.g. a periodic ``model_ckpt_10.pth``).

        Returns:
            True when this checkpoint became the best one.
        """
        value = record.get(self.best.metric)
        tie = record.get(self.best.tie_metric) if self.best.tie_metric else None
        improved = value is not None and self.best.update(value, record["epoch"], tie)
        checkpoint["best"] = self.best.to_dict()
        save_checkpoint(checkpoint, self.last)
        if extra_name:
            save_checkpoint(checkpoint, self.path / extra_name)
        if improved:
            save_checkpoint(checkpoint, self.best_path)
        self.log_metrics({**record, "best": improved})
        return improved


def move_aside(path: Path) -> Path:
    """Move everything in ``path`` (except earlier ``previous-*`` folders) to ``path/previous-<time>/``."""
    target = path / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        suffix += 1
    target.mkdir()
    for item in path.iterdir():
        if item != target and not item.name.startswith(PREVIOUS_PREFIX):
            shutil.move(str(item), target / item.name)
    return target


def _contents(path: Path) -> list[str]:
    """Names in ``path`` that belong to a run (earlier ``previous-*`` folders and temporaries excluded)."""
    if not path.is_dir():
        return []
    def temporary(name: str) -> bool:
        return name.startswith(".") and name.endswith(".tmp")

    return sorted(p.name for p in path.iterdir() if not p.name.startswith(PREVIOUS_PREFIX) and not temporary(p.name))


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
