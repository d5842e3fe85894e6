"""train_volumetric.py under torchrun: 2 CPU processes on the gloo backend, only rank 0 writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import write_datalist
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_two_cpu_processes(tmp_path):
    datalist = write_datalist(tmp_path / "data", label="lesion", n_train=2, n_val=1)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train_volumetric.py"), "--task", "lesion_seg", "--datalist", str(datalist),
               "--epochs", "2", "--batch_size", "1", "--roi_size", "32", "32", "16", "--spacing", "2", "2", "4",
               "--device", "cpu", "--save_dir", str(run)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the caller's entries
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # One line per epoch: rank 1 neither logs nor writes.
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and "val_dice" in r for r in records)
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert not any(k.startswith("module.") for k in ckpt["model"])
    build_model_from_checkpoint(ckpt)  # strict load of the unwrapped DDP weights
    assert result.stdout.count("epoch 1:") == 1
