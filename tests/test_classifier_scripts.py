"""train_classifier.py and evaluate_classifier.py: --help, the original README commands, outputs, resume, errors."""
import csv
import json
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate_classifier
import make_synthetic_data
import train_classifier
from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.covid_mask_net import CLASSIFIER_BUILDER, covid_mask_net
from models.mask_net.workflows import classifier as classifier_workflow
from models.mask_net.workflows.classifier import ClassifierTrainConfig, build_classifier, classifier_loaders
from models.mask_net.workflows.losses import classification_loss, inverse_frequency_weights
from models.mask_net.workflows.model_io import load_model_for_inference
from utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from utils.classification_metrics import classification_report
from utils.cli import config_from_args

ROOT = Path(__file__).resolve().parents[1]
README_TRAIN = ("--pretrained_segmentation_model seg.pth --backbone_name resnet34 --num_epochs 50 --save_every 10 "
                "--num_class 2 --truncation 1 --s_features 512 --roi_batch_size 128 --batch_size 8")
README_EVAL = ("--ckpt cls.pth --truncation 1 --num_class 2 --backbone_name resnet34 --roi_batch_size 128 "
               "--device cpu --s_features 512")
# A small, fast segmentation model: resnet34 truncation 1 as in the README, on 64-px slices.
SEG_KWARGS = dict(backbone_name="resnet34", truncation=1, num_classes=2, min_size=64, max_size=64,
                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)



@pytest.mark.parametrize("script", ["train_classifier.py", "evaluate_classifier.py"])
def test_help_states_every_default(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--num_classes" in out and "Canonical command" in out
    module = train_classifier if script.startswith("train") else evaluate_classifier
    for action in module.get_args_parser()._actions:
        if action.option_strings != ["-h", "--help"]:
            assert "default" in (action.help or "") or "required" in (action.help or ""), action.option_strings


def test_readme_commands_parse_with_the_num_class_abbreviation():
    args = train_classifier.get_args_parser().parse_args(shlex.split(README_TRAIN))
    assert (args.num_classes, args.truncation, args.backbone_name, args.roi_batch_size, args.s_features,
            args.batch_size, args.num_epochs, args.save_every) == (2, 1, "resnet34", 128, 512, 8, 50, 10)
    assert args.loss == "bce"
    args = evaluate_classifier.get_args_parser().parse_args(shlex.split(README_EVAL))
    parsed = (args.num_classes, args.truncation, args.roi_batch_size, args.s_features, args.device)
    assert parsed == (2, 1, 128, 512, "cpu")
    parser = evaluate_classifier.get_args_parser()
    parser.allow_abbrev = False  # the short form is an explicit alias, not a prefix match
    assert parser.parse_args(["--ckpt", "x", "--num_class", "3"]).num_classes == 3


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    make_synthetic_data.main(make_synthetic_data.get_args_parser().parse_args(
        ["--out", str(out), "--seed", "3", "--n_patients", "6", "--slices_per_patient", "2", "--image_size", "64",
         "--outputs", "cls", "--workers", "1", "--no_montage"]))
    return out / "cls"


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = maskrcnn_resnet_fpn(**SEG_KWARGS)
    path = tmp_path_factory.mktemp("seg") / "seg.pth"
    save_checkpoint(make_checkpoint(model=model, builder="models.mask_net.maskrcnn_resnet_fpn",
                                    builder_kwargs=SEG_KWARGS, epoch=0, mask_type="merge"), path)
    return path, model.state_dict()


@pytest.fixture(scope="module")
def trained_run(phantom, seg_checkpoint, tmp_path_factory):
    """The README training command (data directories added), cut to one epoch of two steps."""
    save_dir = tmp_path_factory.mktemp("cls_run")
    argv = shlex.split(README_TRAIN.replace("seg.pth", str(seg_checkpoint[0]))) + [
        "--train_data_dir", str(phantom / "train"), "--val_data_dir", str(phantom / "val"),
        "--num_epochs", "1", "--save_every", "1", "--max_steps", "2", "--batch_size", "2",
        "--save_dir", str(save_dir / "new_folder"), "--no_progress"]
    run = train_classifier.main(train_classifier.get_args_parser().parse_args(argv))
    return run.path


def test_training_writes_the_run_directory_and_copies_segmentation_weights(trained_run, seg_checkpoint):
    names = {p.name for p in trained_run.iterdir()}
    assert {"args.json", "env.txt", "metrics.jsonl", "checkpoint_last.pth", "checkpoint_best.pth",
            "covid_ct_mask_net_ckpt_1.pth"} <= names
    record = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 0 and np.isfinite(record["train_loss"]) and 0 <= record["val_accuracy"] <= 1
    ckpt = load_checkpoint(trained_run / "checkpoint_last.pth")
    assert ckpt["builder"] == "models.mask_net.covid_mask_net"
    assert ckpt["builder_kwargs"]["roi_batch_size"] == 128 and ckpt["builder_kwargs"]["s_features"] == 512
    assert ckpt["builder_kwargs"]["score_columns"] == "per_class", "a new classifier's default row layout"
    seg_state = seg_checkpoint[1]
    frozen = [k for k in ckpt["model"] if k in seg_state and "bn" not in k and "downsample.1" not in k]
    assert frozen and all(torch.equal(ckpt["model"][k], seg_state[k]) for k in frozen), "frozen weights stay as loaded"
    assert all(torch.equal(ckpt["model"][k], seg_state[k]) for k in ckpt["model"] if "running_" in k)


def test_best_checkpoint_is_the_epoch_with_the_highest_validation_accuracy(phantom, seg_checkpoint, tmp_path,
                                                                          monkeypatch):
    values, validate = iter([0.6, 0.9, 0.8]), classifier_workflow.validate
    monkeypatch.setattr(classifier_workflow, "validate",
                        lambda *a, **k: {**validate(*a, **k), "accuracy": next(values)})
    argv = shlex.split(README_TRAIN.replace("seg.pth", str(seg_checkpoint[0]))) + [
        "--train_data_dir", str(phantom / "train"), "--val_data_dir", str(phantom / "val"), "--num_epochs", "3",
        "--max_steps", "1", "--batch_size", "2", "--save_dir", str(tmp_path), "--no_progress"]
    train_classifier.main(train_classifier.get_args_parser().parse_args(argv))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in records] == [0.6, 0.9, 0.8]
    assert all("val_loss" in r and "val_macro_auc" in r for r in records)
    best = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert best["epoch"] == 1 and best["val_accuracy"] == 0.9
    assert best["best"] == {"metric": "val_accuracy", "higher_is_better": True, "value": 0.9, "epoch": 1}


def test_evaluation_readme_command_writes_reports(trained_run, phantom, tmp_path, capsys):
    argv = shlex.split(README_EVAL.replace("cls.pth", str(trained_run / "checkpoint_last.pth"))) + [
        "--test_data_dir", str(phantom / "train"), "--save_dir", str(tmp_path), "--aggregate", "scan", "--no_progress"]
    results = evaluate_classifier.main(evaluate_classifier.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    assert "Confusion matrix" in printed and "Class sensitivity" in printed and "Overall accuracy" in printed
    with (tmp_path / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "patient", "scan", "true", "predicted", "p_Control", "p_CP", "p_COVID-19"]
    probs = np.array([[float(r[k]) for k in ("p_Control", "p_CP", "p_COVID-19")] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    labels = np.array([int(r["true"]) for r in rows])
    assert labels.tolist() == [{"Normal": 0, "CP": 1, "NCP": 2}[Path(r["file"]).name.split("_")[0]] for r in rows]
    independent = classification_report(labels, probs)  # from the CSV alone
    np.testing.assert_array_equal(results["slice"]["confusion_matrix"], independent["confusion_matrix"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["slice"]["n"] == len(rows) and metrics["scan"]["n"] == len({(r["patient"], r["scan"]) for r in rows})
    assert metrics["slice"]["accuracy"] == pytest.approx(independent["accuracy"])
    for png in ("confusion_matrix.png", "roc.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "predictions_scan.csv").is_file()


def test_evaluation_is_deterministic_and_split_file_selects_the_same_slices(trained_run, phantom, tmp_path):
    base = ["--ckpt", str(trained_run / "checkpoint_last.pth"), "--test_data_dir", str(phantom / "val"),
            "--no_progress"]
    parser = evaluate_classifier.get_args_parser()
    first = evaluate_classifier.main(parser.parse_args(base + ["--save_dir", str(tmp_path / "a")]))
    second = evaluate_classifier.main(parser.parse_args(base + ["--save_dir", str(tmp_path / "b"),
                                                                "--split_file", str(phantom / "val_COVIDx_CT.txt")]))
    csv_a, csv_b = ((tmp_path / d / "predictions.csv").read_text() for d in "ab")
    assert csv_a.count("\n") == first["slice"]["n"] + 1 and second["slice"]["n"] == first["slice"]["n"]
    assert sorted(csv_a.splitlines()) == sorted(csv_b.splitlines()), "same slices, same probabilities"


def test_resume_continues_at_the_next_epoch_and_classifier_loads_strictly(trained_run, phantom, tmp_path, capsys):
    argv = ["--resume", str(trained_run / "checkpoint_last.pth"), "--train_data_dir", str(phantom / "train"),
            "--val_data_dir", str(phantom / "val"), "--num_epochs", "2", "--max_steps", "1", "--batch_size", "2",
            "--loss", "ce", "--class_balance", "--split_file", str(phantom / "train_COVIDx_CT.txt"), "--crop_to_box",
            "--val_split_file", str(phantom / "val_COVIDx_CT.txt"),
            "--save_dir", str(tmp_path), "--no_progress"]  # crops differ in size: list batches
    run = train_classifier.main(train_classifier.get_args_parser().parse_args(argv))
    assert "continuing at epoch 1" in capsys.readouterr().out
    epochs = [json.loads(line)["epoch"] for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]
    assert load_checkpoint(run.path / "checkpoint_last.pth")["epoch"] == 1


def test_wrong_flags_and_files_are_named(trained_run, seg_checkpoint, phantom):
    parser = evaluate_classifier.get_args_parser()
    with pytest.raises(ValueError, match="--truncation 2 contradicts the checkpoint"):
        evaluate_classifier.main(parser.parse_args(["--ckpt", str(trained_run / "checkpoint_last.pth"),
                                                    "--truncation", "2", "--test_data_dir", str(phantom / "val")]))
    with pytest.raises(ValueError, match="--score_columns shared contradicts the checkpoint"):
        evaluate_classifier.main(parser.parse_args(["--ckpt", str(trained_run / "checkpoint_last.pth"),
                                                    "--score_columns", "shared", "--test_data_dir",
                                                    str(phantom / "val")]))
    with pytest.raises(ValueError, match="not a classification checkpoint"):
        evaluate_classifier.main(parser.parse_args(["--ckpt", str(seg_checkpoint[0]),
                                                    "--test_data_dir", str(phantom / "val")]))
    train_parser = train_classifier.get_args_parser()

    def config(argv):
        return config_from_args(ClassifierTrainConfig, train_parser.parse_args(argv))

    with pytest.raises(ValueError, match="cannot be trained from scratch"):
        build_classifier(config([]))
    with pytest.raises(ValueError, match="--crop_to_box needs --split_file and --val_split_file"):
        classifier_loaders(config(["--crop_to_box", "--split_file", "x.txt"]))
    with pytest.raises(ValueError, match="--num_classes 3 contradicts"):
        build_classifier(config(["--pretrained_segmentation_model", str(seg_checkpoint[0]), "--num_class", "3"]))


@pytest.mark.parametrize("stored", [{}, {"score_columns": "shared"}, {"score_columns": "per_class"}])
def test_classifier_checkpoints_rebuild_their_row_layout_and_old_ones_the_originals(stored, tmp_path):
    kwargs = dict(SEG_KWARGS, num_classes=3, roi_batch_size=8, s_features=16, **stored)
    path = tmp_path / "cls.pth"
    save_checkpoint(make_checkpoint(model=covid_mask_net(**kwargs), builder=CLASSIFIER_BUILDER,
                                    builder_kwargs=kwargs, epoch=0), path)
    model, _ = load_model_for_inference(str(path), device=torch.device("cpu"), flags={}, builder=CLASSIFIER_BUILDER,
                                        kind="classification")
    layout = stored.get("score_columns", "shared")  # checkpoints written before the option: the original's rows
    assert model.score_columns == layout
    assert model.s_module[0].in_features == 8 * {"shared": 5, "per_class": 6}[layout]
    other = {"shared": "per_class", "per_class": "shared"}[layout]
    refused = f"--score_columns {other} contradicts the checkpoint .* score_columns={layout}"
    with pytest.raises(ValueError, match=refused):
        load_model_for_inference(str(path), device=torch.device("cpu"), flags={"score_columns": other},
                                 builder=CLASSIFIER_BUILDER, kind="classification")


def test_train_classifier_score_columns_flag_selects_the_original_rows(phantom, seg_checkpoint, tmp_path):
    argv = shlex.split(README_TRAIN.replace("seg.pth", str(seg_checkpoint[0]))) + [
        "--train_data_dir", str(phantom / "train"), "--val_data_dir", str(phantom / "val"), "--num_epochs", "1",
        "--max_steps", "1", "--batch_size", "2", "--save_dir", str(tmp_path), "--no_progress",
        "--score_columns", "shared"]
    train_classifier.main(train_classifier.get_args_parser().parse_args(argv))
    assert load_checkpoint(tmp_path / "checkpoint_last.pth")["builder_kwargs"]["score_columns"] == "shared"


def test_loss_options_match_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    bce = classification_loss(logits, labels, kind="bce")
    by_hand = -(torch.log(torch.sigmoid(torch.tensor([2.0, 0.3]))).sum()
                + torch.log(1 - torch.sigmoid(torch.tensor([-1.0, 0.5, 0.1, 0.2]))).sum()) / 6
    assert bce == pytest.approx(float(by_hand), rel=1e-5)
    ce = classification_loss(logits, labels, kind="ce", class_weights=torch.tensor([1.0, 1.0, 3.0]))
    per = -torch.log_softmax(logits, 1)[[0, 1], [0, 2]]
    assert ce == pytest.approx(float((per[0] + 3 * per[1]) / 4), rel=1e-5)
    np.testing.assert_allclose(inverse_frequency_weights([0, 0, 0, 1]).numpy(), [4 / 9, 4 / 3, 0])
