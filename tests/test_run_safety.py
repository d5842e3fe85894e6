"""Nothing lost, nothing silently wrong: run directories, resume, checkpoints, in every trainer."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import train_classifier
import train_segmentation
import train_volumetric
from datasets.synthetic import generate_dataset
from models.mask_net import maskrcnn_resnet_fpn
from tests.helpers import write_datalist
from utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from utils.run_dir import Best, RunDir
from utils.training import apply_hyperparameters

SEG_BUILDER = "models.mask_net.maskrcnn_resnet_fpn"
TINY_SEG = {"backbone_name": "resnet18", "truncation": 2, "num_classes": 2, "min_size": 64, "max_size": 128}
LESION_FLAGS = ["--roi_size", "32", "32", "16", "--spacing", "2", "2", "4"]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def seg_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    generate_dataset(out, seed=2, n_seg_patients=3, slices_per_patient=2, image_size=64, outputs=("seg",),
                     montage=False)
    return out / "seg"


@pytest.fixture(scope="module")
def cls_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_cls")
    generate_dataset(out, seed=3, n_patients=6, slices_per_patient=2, image_size=64, outputs=("cls",),
                     montage=False, workers=1)
    return out / "cls"


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "seg.pth"
    torch.manual_seed(0)
    save_checkpoint(make_checkpoint(model=maskrcnn_resnet_fpn(**TINY_SEG), builder=SEG_BUILDER,
                                    builder_kwargs=TINY_SEG, epoch=0, mask_type="merge"), path)
    return path


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_datalist(tmp_path_factory.mktemp("vol"), label="lesion", n_train=2, n_val=1)


def seg_argv(seg_root, save_dir, *extra):
    return ["--num_epochs", "1", "--mask_type", "merge", "--backbone_name", "resnet18", "--truncation", "2",
            "--train_data_dir", str(seg_root / "train"), "--val_data_dir", str(seg_root / "test"),
            "--save_dir", str(save_dir), "--image_size", "64", "--max_steps", "2", "--batch_size", "2",
            "--lrate", "1e-4", "--no_progress", *extra]


def cls_argv(cls_root, seg_ckpt, save_dir, *extra):
    return ["--pretrained_segmentation_model", str(seg_ckpt), "--num_epochs", "1", "--roi_batch_size", "8",
            "--s_features", "16", "--train_data_dir", str(cls_root / "train"), "--val_data_dir", str(cls_root / "val"),
            "--save_dir", str(save_dir), "--max_steps", "2", "--batch_size", "2", "--no_progress", *extra]


def vol_argv(datalist, save_dir, *extra):
    return ["--task", "lesion_seg", "--datalist", str(datalist), "--epochs", "1", "--batch_size", "2",
            "--save_dir", str(save_dir), "--no_progress", *LESION_FLAGS, *extra]


def train(script, argv):
    return script.main(script.get_args_parser().parse_args(argv))


def epochs_logged(run_dir) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------- 1. run directories
def test_a_used_run_directory_is_refused_by_every_trainer(seg_root, cls_root, seg_ckpt, datalist, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"epoch": 0}\n')
    for script, argv in ((train_segmentation, seg_argv(seg_root, used)),
                         (train_classifier, cls_argv(cls_root, seg_ckpt, used)),
                         (train_volumetric, vol_argv(datalist, used))):
        with pytest.raises(FileExistsError, match="already holds a run.*--resume.*--overwrite"):
            train(script, argv)
    assert (used / "metrics.jsonl").read_text() == '{"epoch": 0}\n' and sorted(os.listdir(used)) == ["metrics.jsonl"]


def test_overwrite_moves_the_old_run_aside(seg_root, tmp_path):
    run = tmp_path / "run"
    train(train_segmentation, seg_argv(seg_root, run))
    old_best = load_checkpoint(run / "checkpoint_best.pth")["model"]
    train(train_segmentation, seg_argv(seg_root, run, "--overwrite", "--seed", "5"))
    previous = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert {"args.json", "metrics.jsonl", "checkpoint_last.pth", "checkpoint_best.pth"} <= set(os.listdir(previous[0]))
    kept = load_checkpoint(previous[0] / "checkpoint_best.pth")["model"]
    assert all(torch.equal(kept[k], old_best[k]) for k in old_best)
    assert epochs_logged(run) == [0] and epochs_logged(previous[0]) == [0]


@pytest.mark.parametrize("script,flag", [(train_segmentation, "--num_epochs"), (train_classifier, "--num_epochs"),
                                         (train_volumetric, "--epochs"), (train_segmentation, "--save_every"),
                                         (train_segmentation, "--image_size"), (train_classifier, "--save_every"),
                                         (train_volumetric, "--val_every")])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_zero_or_negative_counts_are_refused_up_front(script, flag, value, capsys):
    argv = ["--task", "lung_seg", "--datalist", "x.json"] if script is train_volumetric else []
    with pytest.raises(SystemExit) as exit_info:
        script.get_args_parser().parse_args([*argv, flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


# ------------------------------------------------------------------- 2. best survives resume
def test_best_is_restored_on_resume_and_never_replaced_by_a_worse_model(tmp_path):
    ckpt = make_checkpoint(model={"w": torch.zeros(1)}, builder=SEG_BUILDER, builder_kwargs={}, epoch=0)
    run = RunDir(tmp_path, args={})
    for epoch, value in enumerate([1.3, 1.187, 1.21]):
        run.end_epoch(dict(ckpt, epoch=epoch), {"epoch": epoch, "val_loss": value})
    resumed = RunDir(tmp_path, args={}, resume=True)
    resumed.restore_best(load_checkpoint(tmp_path / "checkpoint_last.pth"))
    assert not resumed.end_epoch(dict(ckpt, epoch=3), {"epoch": 3, "val_loss": 1.25})
    best = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert best["epoch"] == 1 and best["best"]["value"] == 1.187


def test_resume_across_a_change_of_selection_metric_keeps_the_old_best(tmp_path):
    ckpt = make_checkpoint(model={"w": torch.zeros(1)}, builder=SEG_BUILDER, builder_kwargs={}, epoch=0)
    old = RunDir(tmp_path, args={})
    old.end_epoch(dict(ckpt), {"epoch": 0, "val_loss": 0.5})
    resumed = RunDir(tmp_path, args={}, resume=True, best=Best("val_segm_mAP", higher_is_better=True))
    resumed.restore_best(load_checkpoint(tmp_path / "checkpoint_last.pth"))
    assert (tmp_path / "checkpoint_best_by_val_loss.pth").is_file() and not resumed.best_path.exists()
    assert resumed.end_epoch(dict(ckpt, epoch=1), {"epoch": 1, "val_segm_mAP": 0.01})
    assert load_checkpoint(resumed.best_path)["best"]["metric"] == "val_segm_mAP"


def test_a_tie_goes_to_the_later_epoch_and_a_worse_value_never_wins():
    best = Best("val_segm_mAP", higher_is_better=True)
    assert best.update(0.0, 0) and best.update(0.0, 1) and best.epoch == 1
    assert not best.update(-0.1, 2) and not best.update(float("nan"), 3) and best.epoch == 1


def test_a_tie_metric_decides_between_equal_values_and_survives_resume(tmp_path):
    best = Best("val_auc", True, tie_metric="val_log_loss", tie_higher_is_better=False)
    assert best.update(1.0, 0, 0.40) and best.update(1.0, 1, 0.35) and best.epoch == 1
    assert not best.update(1.0, 2, 0.76) and best.epoch == 1  # same AUC, worse probabilities
    assert not best.update(0.9, 3, 0.10) and best.update(1.0, 4, float("nan")) and best.epoch == 4
    assert best.update(1.0, 5, 0.9)  # after an epoch without a tie value, a tie goes to the later one

    ckpt = make_checkpoint(model={"w": torch.zeros(1)}, builder=SEG_BUILDER, builder_kwargs={}, epoch=0)
    run = RunDir(tmp_path, args={}, best=Best("val_auc", True, tie_metric="val_log_loss"))
    assert run.end_epoch(dict(ckpt), {"epoch": 0, "val_auc": 1.0, "val_log_loss": 0.3})
    resumed = RunDir(tmp_path, args={}, resume=True, best=Best("val_auc", True, tie_metric="val_log_loss"))
    resumed.restore_best(load_checkpoint(tmp_path / "checkpoint_last.pth"))
    assert resumed.best.tie_value == 0.3
    assert not resumed.end_epoch(dict(ckpt, epoch=1), {"epoch": 1, "val_auc": 1.0, "val_log_loss": 0.7})
    assert load_checkpoint(resumed.best_path)["epoch"] == 0


def _resume_after_a_better_past(script, argv, run, metric: str, past_value: float):
    """Train one epoch, pretend an earlier epoch was far better, resume: checkpoint_best must stay."""
    train(script, argv)
    last = load_checkpoint(run / "checkpoint_last.pth")
    last["best"]["value"] = past_value
    save_checkpoint(last, run / "checkpoint_last.pth")
    save_checkpoint(last, run / "checkpoint_best.pth")
    resume_argv = [*argv, "--resume", str(run / "checkpoint_last.pth")]
    resume_argv[resume_argv.index("--epochs" if script is train_volumetric else "--num_epochs") + 1] = "2"
    train(script, resume_argv)
    assert epochs_logged(run) == [0, 1]
    assert load_checkpoint(run / "checkpoint_best.pth")["epoch"] == 0
    assert load_checkpoint(run / "checkpoint_last.pth")["best"] == {**last["best"], "metric": metric}


def test_resume_keeps_the_best_checkpoint_2d(seg_root, cls_root, seg_ckpt, tmp_path):
    _resume_after_a_better_past(train_segmentation, seg_argv(seg_root, tmp_path / "seg"), tmp_path / "seg",
                                "val_segm_mAP", 2.0)  # above any reachable mAP
    _resume_after_a_better_past(train_classifier, cls_argv(cls_root, seg_ckpt, tmp_path / "cls"), tmp_path / "cls",
                                "val_accuracy", 2.0)  # above any reachable accuracy


def test_resume_keeps_the_best_checkpoint_3d(datalist, tmp_path):
    _resume_after_a_better_past(train_volumetric, vol_argv(datalist, tmp_path / "vol"), tmp_path / "vol",
                                "val_dice", 2.0)


# --------------------------------------------------------- 8. lr on resume (7: tests/test_ddp_2d.py)
def test_a_changed_learning_rate_is_applied_on_resume_and_logged(seg_root, tmp_path):
    run = tmp_path / "run"
    train(train_segmentation, seg_argv(seg_root, run))
    argv = seg_argv(seg_root, run, "--resume", str(run / "checkpoint_last.pth"))
    argv[argv.index("--num_epochs") + 1], argv[argv.index("--lrate") + 1] = "2", "3e-4"
    train(train_segmentation, argv)
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-4, 3e-4]
    assert all(g["lr"] == 3e-4 for g in load_checkpoint(run / "checkpoint_last.pth")["optimizer"]["param_groups"])


def test_apply_hyperparameters_reports_each_change():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=0.0)
    assert apply_hyperparameters(optimizer, {"lr": 1e-3, "weight_decay": None}) == []
    assert apply_hyperparameters(optimizer, {"lr": 2e-3}) == ["lr changed on resume: 0.001 -> 0.002"]
    assert optimizer.param_groups[0]["lr"] == 2e-3


# ----------------------------------------------- 9, 10, 12. metrics order, temporaries, permissions
def test_metrics_line_is_written_only_after_the_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path, args={}, best=Best("val_loss", False))
    ckpt = make_checkpoint(model={"w": torch.zeros(1)}, builder=SEG_BUILDER, builder_kwargs={}, epoch=0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        run.end_epoch(ckpt, {"epoch": 0, "val_loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == [], "the failed write's temp file is removed"


def test_stale_temporaries_are_removed_when_a_run_resumes(tmp_path):
    stale = tmp_path / ".checkpoint_last.pth.k3j2h1.tmp"
    stale.write_bytes(b"x" * 100)
    (tmp_path / "notes.tmp").write_text("a user's file")
    RunDir(tmp_path, args={}, resume=True)
    assert not stale.exists() and (tmp_path / "notes.tmp").exists()


def test_checkpoints_get_the_permissions_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"w": torch.zeros(1)}, tmp_path / "c.pth")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


# --------------------------------------------------------------------- clear errors, exit codes
def test_resume_from_a_checkpoint_of_another_kind_names_it(seg_root, cls_root, seg_ckpt, tmp_path):
    foreign = tmp_path / "lung.pth"
    save_checkpoint(make_checkpoint(model={}, builder="models.volumetric.lung_seg.build_network", builder_kwargs={},
                                    epoch=0, task="lung_seg"), foreign)
    with pytest.raises(ValueError, match="lung.pth: not a segmentation checkpoint.*lung_seg"):
        train(train_segmentation, seg_argv(seg_root, tmp_path / "a", "--resume", str(foreign)))
    with pytest.raises(ValueError, match="lung.pth: not a classification checkpoint"):
        train(train_classifier, cls_argv(cls_root, seg_ckpt, tmp_path / "b", "--resume", str(foreign)))
    with pytest.raises(ValueError, match="lung.pth: not a checkpoint of models.mask_net"):
        train(train_classifier, cls_argv(cls_root, foreign, tmp_path / "c"))
    with pytest.raises(ValueError, match="its weights do not fit the model built from these flags"):
        train(train_segmentation, seg_argv(seg_root, tmp_path / "d", "--resume", str(seg_ckpt), "--truncation", "1"))


def _eight_bit_datalist(datalist, tmp_path):
    """The datalist with its first training image rescaled to 0..255 (not HU)."""
    import nibabel as nib
    import numpy as np

    listing = json.loads(datalist.read_text())
    source = nib.load(datalist.parent / listing["training"][0]["image"])
    array = np.asarray(source.dataobj, dtype=np.float32)
    scaled = ((array - array.min()) / (array.max() - array.min()) * 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(scaled, source.affine), tmp_path / "eight_bit.nii.gz")
    listing["training"][0]["image"] = str(tmp_path / "eight_bit.nii.gz")
    path = datalist.parent / f"eight_bit_{tmp_path.name}.json"  # beside the original: relative labels resolve
    path.write_text(json.dumps(listing))
    return path, "eight_bit.nii.gz"


def _missing_file_datalist(datalist, tmp_path):
    entry = {"image": "missing.nii.gz", "label": "missing_label.nii.gz"}
    (tmp_path / "missing.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    return tmp_path / "missing.json", "missing.nii.gz"


@pytest.mark.parametrize("make_bad", [_missing_file_datalist, _eight_bit_datalist])
def test_a_user_error_in_train_volumetric_exits_1_with_one_line(datalist, tmp_path, make_bad):
    """Once, a ValueError raised while MONAI cached the cases ended in SIGABRT (exit 134)."""
    bad, name = make_bad(datalist, tmp_path)
    proc = subprocess.run([sys.executable, "train_volumetric.py", *vol_argv(bad, tmp_path / "run"), "--strict_hu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0] and "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, "train_volumetric.py", *vol_argv(bad, tmp_path / "run"), "--strict_hu",
                            "--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and name in debug.stderr


def test_a_single_case_last_batch_is_dropped_so_batchnorm_can_train(tmp_path, monkeypatch):
    from models.volumetric import covid_cls
    from models.volumetric.training import make_train_loader
    from tests.helpers import TINY_NET
    from tests.helpers import cls_datalist as _phantom_datalist
    from utils.distributed import DistContext

    ctx = DistContext(0, 1, torch.device("cpu"))
    sizes = {n: [len(b) for b in make_train_loader(list(range(n)), batch_size=2, ctx=ctx, seed=0)] for n in (1, 3, 4)}
    assert sizes == {1: [1], 3: [2], 4: [2, 2]}
    for key, value in TINY_NET.items():
        monkeypatch.setitem(covid_cls.TASK.network_kwargs, key, value)
    datalist = _phantom_datalist(tmp_path / "data")
    listing = json.loads(datalist.read_text())
    listing["training"].append(listing["training"][0])  # three cases: batches of 2 and 1 before the fix
    datalist.write_text(json.dumps(listing))
    train(train_volumetric, ["--task", "covid_cls", "--datalist", str(datalist), "--epochs", "1", "--batch_size", "2",
                             "--roi_size", "32", "32", "32", "--save_dir", str(tmp_path / "run"), "--no_progress"])
    assert epochs_logged(tmp_path / "run") == [0]
    best = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["best"]  # AUC ties broken by log loss
    assert best["metric"] == "val_auc" and best["tie_metric"] == "val_log_loss"
