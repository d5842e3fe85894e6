"""One torchrun process of a 2D trainer, recording what it loads and writes (for tests/test_ddp_2d.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py LOG_DIR SCRIPT [flags]

SCRIPT is ``train_segmentation`` or ``train_classifier``. Each rank appends JSON lines to
``LOG_DIR/rank<r>.jsonl``: ``{"load": root, "index": i, "epoch": e}`` for every slice a dataset loads
(``epoch`` from the last ``DistributedSampler.set_epoch``), and ``{"write": what}`` whenever it opens a
run directory, saves a checkpoint or logs a metrics line.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from torch.utils.data import DistributedSampler

from datasets.classification import SliceClassificationDataset
from datasets.segmentation import CNCBSegmentationDataset
from utils import run_dir

EPOCH = {"value": None}


def record(log_dir: Path, entry: dict) -> None:
    with (log_dir / f"rank{os.environ['RANK']}.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def patch_loads(log_dir: Path) -> None:
    """Record each slice a dataset loads, and the sampler's epoch."""
    set_epoch = DistributedSampler.set_epoch

    def set_epoch_recorded(self, epoch):
        EPOCH["value"] = epoch
        set_epoch(self, epoch)

    DistributedSampler.set_epoch = set_epoch_recorded
    for cls in (CNCBSegmentationDataset, SliceClassificationDataset):
        def getitem(self, index, _original=cls.__getitem__):
            record(log_dir, {"load": str(self.root), "index": int(index), "epoch": EPOCH["value"]})
            return _original(self, index)
        cls.__getitem__ = getitem


def patch_writes(log_dir: Path) -> None:
    """Record every write to a run directory."""
    init, log_metrics, save = run_dir.RunDir.__init__, run_dir.RunDir.log_metrics, run_dir.save_checkpoint

    def init_recorded(self, *args, **kwargs):
        record(log_dir, {"write": "run directory"})
        init(self, *args, **kwargs)

    def log_recorded(self, entry):
        record(log_dir, {"write": "metrics"})
        log_metrics(self, entry)

    def save_recorded(checkpoint, path):
        record(log_dir, {"write": f"checkpoint {Path(path).name}"})
        save(checkpoint, path)

    run_dir.RunDir.__init__, run_dir.RunDir.log_metrics, run_dir.save_checkpoint = (
        init_recorded, log_recorded, save_recorded)


def main(argv: list[str]) -> None:
    log_dir, script = Path(argv[0]), importlib.import_module(argv[1])
    log_dir.mkdir(parents=True, exist_ok=True)
    patch_loads(log_dir)
    patch_writes(log_dir)
    script.main(script.get_args_parser().parse_args(argv[2:]))


if __name__ == "__main__":
    main(sys.argv[1:])
