"""The 2D trainers under torchrun: 2 CPU processes on the gloo backend (tests/ddp_worker.py runs each one).

The classifier's 2 processes x 1 slice step as 1 process x 2 slices; the segmentation model sees
each training slice once per epoch across the ranks, rank 1 never writes, and --resume continues.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

import train_classifier
from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.covid_mask_net import covid_mask_net
from models.mask_net.workflows import classifier as classifier_workflow
from tests.helpers import write_slice_phantom
from utils.checkpoint import (
    SEGMENTATION_BUILDER,
    build_model_from_checkpoint,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from utils.distributed import DistContext, distribute, sync_batchnorm

REPO = Path(__file__).resolve().parents[1]
SEG_KWARGS = dict(backbone_name="resnet18", truncation=1, num_classes=2, min_size=64, max_size=64)
SLICES = 6  # per split: 3 steps of 2 slices per epoch


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_slice_phantom(tmp_path_factory.mktemp("phantom"), slices_per_patient=SLICES)


def torchrun(script: str, argv: list[str], log_dir: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` as 2 gloo CPU processes; each rank records its loads and writes in ``log_dir``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "ddp_worker.py"), str(log_dir), script, *argv, "--device", "cpu",
               "--no_progress"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def rank_log(log_dir: Path, rank: int) -> list[dict]:
    path = log_dir / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def training_loads(log_dir: Path, rank: int, root: Path) -> dict[int, list[int]]:
    """Epoch -> indices of the training slices this rank loaded, in order."""
    loads: dict[int, list[int]] = {}
    for entry in rank_log(log_dir, rank):
        if entry.get("load") == str(root):
            loads.setdefault(entry["epoch"], []).append(entry["index"])
    return loads


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------- classifier
def _seg_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(make_checkpoint(model=maskrcnn_resnet_fpn(**SEG_KWARGS), builder=SEGMENTATION_BUILDER,
                                    builder_kwargs=SEG_KWARGS, epoch=0, mask_type="merge"), path)
    return path


def _classifier_argv(phantom: Path, seg: Path, save_dir: Path, batch_size: int) -> list[str]:
    return ["--pretrained_segmentation_model", str(seg), "--train_data_dir", str(phantom / "cls" / "train"),
            "--val_data_dir", str(phantom / "cls" / "val"), "--batch_size", str(batch_size), "--num_epochs", "1",
            "--roi_batch_size", "8", "--s_features", "16", "--lrate", "1e-3", "--save_dir", str(save_dir),
            "--max_steps", "3", "--seed", "3"]


def test_classifier_two_processes_step_as_one_process_with_twice_the_batch(phantom, tmp_path, monkeypatch):
    seg = _seg_checkpoint(tmp_path / "seg.pth")
    torchrun("train_classifier", _classifier_argv(phantom, seg, tmp_path / "ddp", 1), tmp_path / "log")
    # One process over the same permutation: a DistributedSampler of one replica yields the permutation
    # that the two ranks take every other index of, so each step sees the same pair of slices.
    monkeypatch.setattr(classifier_workflow, "train_shuffling", lambda dataset, ctx, seed: {
        "sampler": DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)})
    parse = train_classifier.get_args_parser().parse_args
    train_classifier.main(parse([*_classifier_argv(phantom, seg, tmp_path / "one", 2), "--no_progress"]))
    ddp, one = load_checkpoint(tmp_path / "ddp" / "checkpoint_last.pth"), load_checkpoint(tmp_path / "one" /
                                                                                          "checkpoint_last.pth")
    assert set(ddp["model"]) == set(one["model"]) and not any(k.startswith("module.") for k in ddp["model"])
    assert {int(state["step"]) for state in ddp["optimizer"]["state"].values()} == {3}, "3 Adam steps"
    for key in ddp["model"]:
        torch.testing.assert_close(ddp["model"][key], one["model"][key], atol=1e-5, rtol=0, msg=key)
    loads = [training_loads(tmp_path / "log", r, phantom / "cls" / "train")[0] for r in (0, 1)]
    assert sorted(loads[0] + loads[1]) == list(range(SLICES))
    assert [r["world_size"] for r in records(tmp_path / "ddp")] == [2]


# --------------------------------------------------------------------------------- segmentation
def _segmentation_argv(phantom: Path, save_dir: Path, epochs: int) -> list[str]:
    # The test split holds the lesions; the training split is a Control patient's.
    return ["--num_epochs", str(epochs), "--mask_type", "merge", "--train_data_dir", str(phantom / "seg" / "test"),
            "--val_data_dir", str(phantom / "seg" / "val"), "--image_size", "64", "--batch_size", "1",
            "--lrate", "1e-4", "--save_dir", str(save_dir)]


@pytest.fixture(scope="module")
def seg_run(phantom, tmp_path_factory):
    """A 2-epoch segmentation run of 2 processes: its run directory, log folder and output."""
    root = tmp_path_factory.mktemp("seg_ddp")
    result = torchrun("train_segmentation", _segmentation_argv(phantom, root / "run", 2), root / "log")
    return root / "run", root / "log", result.stdout


def test_segmentation_sees_every_slice_once_per_epoch_and_only_rank_0_writes(phantom, seg_run):
    run, log_dir, stdout = seg_run
    loads = [training_loads(log_dir, rank, phantom / "seg" / "test") for rank in (0, 1)]
    for epoch in (0, 1):
        assert sorted(loads[0][epoch] + loads[1][epoch]) == list(range(SLICES)), epoch
    assert loads[0][0] != loads[0][1], "set_epoch gives each epoch its own order"
    assert [r["epoch"] for r in records(run)] == [0, 1]
    assert all(r["world_size"] == 2 and "val_segm_mAP" in r for r in records(run))
    assert not [e for e in rank_log(log_dir, 1) if "write" in e or e.get("load") == str(phantom / "seg" / "val")], \
        "rank 1 neither writes nor validates"
    assert stdout.count("Epoch 1:") == 1
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert ckpt["args"]["sync_bn"] is False
    build_model_from_checkpoint(ckpt)  # the unwrapped weights load strictly in one process


@pytest.fixture(scope="module")
def seg_resumed(phantom, seg_run, tmp_path_factory):
    """``seg_run`` copied and resumed by 2 processes for a third epoch: run directory, log folder, output."""
    root = tmp_path_factory.mktemp("seg_resumed")
    shutil.copytree(seg_run[0], root / "run")
    result = torchrun("train_segmentation", [*_segmentation_argv(phantom, root / "run", 3), "--resume",
                                             str(root / "run" / "checkpoint_last.pth")], root / "log")
    return root / "run", root / "log", result.stdout


def test_segmentation_resume_under_ddp_continues_at_the_next_epoch(phantom, seg_run, seg_resumed):
    run, log_dir, stdout = seg_resumed
    assert stdout.count("continuing at epoch 2") == 2, "every rank resumes"
    assert [r["epoch"] for r in records(run)] == [0, 1, 2]
    loads = [training_loads(log_dir, rank, phantom / "seg" / "test") for rank in (0, 1)]
    assert set(loads[0]) == set(loads[1]) == {2}
    assert sorted(loads[0][2] + loads[1][2]) == list(range(SLICES))
    before, last = load_checkpoint(seg_run[0] / "checkpoint_last.pth"), load_checkpoint(run / "checkpoint_last.pth")
    assert last["epoch"] == 2 and last["best"]["epoch"] >= before["best"]["epoch"]
    assert not [e for e in rank_log(log_dir, 1) if "write" in e]


def test_segmentation_resumed_under_ddp_ends_as_a_straight_run(phantom, seg_resumed, tmp_path):
    torchrun("train_segmentation", _segmentation_argv(phantom, tmp_path / "run", 3), tmp_path / "log")
    straight = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["model"]
    resumed = load_checkpoint(seg_resumed[0] / "checkpoint_last.pth")["model"]
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def test_a_used_save_dir_is_refused_on_every_rank(phantom, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    result = torchrun("train_segmentation", _segmentation_argv(phantom, tmp_path / "run", 1), tmp_path / "log",
                      check=False)
    assert result.returncode != 0 and "already holds a run" in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


# ------------------------------------------------------------------------------------- sync_bn
def test_sync_bn_converts_only_batchnorm_that_trains_on_batch_statistics():
    model = maskrcnn_resnet_fpn(**SEG_KWARGS)
    keys = list(model.state_dict())
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert norms > 0 and sync_batchnorm(model) == norms
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == norms
    assert list(model.state_dict()) == keys, "checkpoints keep their keys"
    assert sync_batchnorm(maskrcnn_resnet_fpn(**SEG_KWARGS, norm="frozen")) == 0
    classifier = covid_mask_net(**SEG_KWARGS, roi_batch_size=8, s_features=16)
    assert sync_batchnorm(classifier) == 0, "the classifier's backbone normalises with frozen running statistics"


def test_sync_bn_is_refused_on_cpu_processes():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="--sync_bn needs CUDA"):
        distribute(model, DistContext(0, 2, torch.device("cpu")), sync_bn=True)
    assert distribute(model, DistContext(0, 1, torch.device("cpu")), sync_bn=True) is model
