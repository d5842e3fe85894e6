"""A training run killed with SIGKILL and resumed ends with the same weights as one that went straight
through (CPU, same seed), for the 2D and the 3D track.

Each run is a real subprocess of the training script. The interrupted run is killed as soon as the
first epoch's metrics line appears, i.e. during the second epoch, after its checkpoint was saved.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.synthetic import generate_dataset
from tests.helpers import write_datalist
from utils.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_after_first_epoch(argv: list[str], run_dir: Path) -> None:
    """Start the run and SIGKILL it once epoch 0 is logged (its checkpoint is then on disk)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "epoch 0 never finished"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a), load_checkpoint(b)
    assert first["epoch"] == second["epoch"]
    differ = [k for k in first["model"] if not torch.equal(first["model"][k], second["model"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _kill_resume_compare(argv: list[str], tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run([*argv, "--save_dir", str(straight)])
    _kill_after_first_epoch([*argv, "--save_dir", str(killed)], killed)
    logged = (killed / "metrics.jsonl").read_text().count("\n")
    _run([*argv, "--save_dir", str(killed), "--resume", str(killed / "checkpoint_last.pth")])
    _assert_same_weights(straight / "checkpoint_last.pth", killed / "checkpoint_last.pth")
    epochs = [line.split(",")[0] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == len(set(epochs)) == (straight / "metrics.jsonl").read_text().count("\n") >= logged
    assert not list(killed.glob(".*.tmp")), "stale temporaries are removed on resume"


def test_2d_segmentation_resumes_bit_exactly_after_sigkill(tmp_path):
    data = tmp_path / "phantom"
    generate_dataset(data, seed=4, n_seg_patients=3, slices_per_patient=2, image_size=64, outputs=("seg",),
                     montage=False)
    _kill_resume_compare(["train_segmentation.py", "--num_epochs", "3", "--mask_type", "merge",
                          "--truncation", "2", "--image_size", "64", "--batch_size", "2", "--lrate", "1e-3",
                          "--train_data_dir", str(data / "seg" / "train"), "--val_data_dir", str(data / "seg" / "test"),
                          "--no_progress", "--seed", "3"], tmp_path)


def test_3d_lesion_seg_resumes_bit_exactly_after_sigkill(tmp_path):
    datalist = write_datalist(tmp_path / "data", label="lesion", n_train=3, n_val=1)
    _kill_resume_compare(["train_volumetric.py", "--task", "lesion_seg", "--datalist", str(datalist), "--epochs", "3",
                          "--batch_size", "2", "--roi_size", "32", "32", "16", "--spacing", "2", "2", "4",
                          "--no_progress", "--seed", "3"], tmp_path)


@pytest.mark.parametrize("epochs", [2])
def test_uninterrupted_runs_repeat(tmp_path, epochs):
    """The baseline the resume test relies on: the same command twice gives the same weights."""
    datalist = write_datalist(tmp_path / "data", label="lesion", n_train=2, n_val=1)
    argv = ["train_volumetric.py", "--task", "lesion_seg", "--datalist", str(datalist), "--epochs", str(epochs),
            "--roi_size", "32", "32", "16", "--spacing", "2", "2", "4", "--no_progress"]
    _run([*argv, "--save_dir", str(tmp_path / "a")])
    _run([*argv, "--save_dir", str(tmp_path / "b")])
    _assert_same_weights(tmp_path / "a" / "checkpoint_last.pth", tmp_path / "b" / "checkpoint_last.pth")
