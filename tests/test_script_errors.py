"""User errors in the evaluation, inference, data and conversion scripts: refused up front, named in one line.

Out-of-range thresholds and sizes are argparse errors; a checkpoint of another kind is refused by its
builder before any model is built; run as a command, a user error is one ``error:`` line on stderr,
exit code 1 and no traceback (``--debug`` shows it).
"""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate_classifier
import evaluation_mean_ap
import inference_segmentation
import make_synthetic_data
from models.mask_net import covid_mask_net, maskrcnn_resnet_fpn
from tests.helpers import write_slice_phantom
from utils.checkpoint import make_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = {"segmentation": "models.mask_net.maskrcnn_resnet_fpn", "classification": "models.mask_net.covid_mask_net",
            "lung_seg": "models.volumetric.lung_seg.build_network"}
SMALL = dict(backbone_name="resnet18", truncation=1, num_classes=2, min_size=64, max_size=64)
CLS_KWARGS = dict(SMALL, roi_batch_size=8, s_features=16)
MESSAGES = {"segmentation": "not a segmentation checkpoint", "classification": "not a classification checkpoint"}
SCRIPTS = {"evaluation_mean_ap": (evaluation_mean_ap, "segmentation"),
           "inference_segmentation": (inference_segmentation, "segmentation"),
           "evaluate_classifier": (evaluate_classifier, "classification")}
WRONG_KINDS = [(script, wrong) for script, (_, kind) in SCRIPTS.items()
               for wrong in ("segmentation", "classification", "lung_seg") if wrong != kind]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_slice_phantom(tmp_path_factory.mktemp("phantom"), slices_per_patient=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One small checkpoint of each kind: 2D segmentation, 2D classification and a 3D lung_seg stand-in."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    made = {"segmentation": make_checkpoint(model=maskrcnn_resnet_fpn(**SMALL), builder=BUILDERS["segmentation"],
                                            builder_kwargs=SMALL, epoch=0, mask_type="merge"),
            "classification": make_checkpoint(model=covid_mask_net(**CLS_KWARGS), builder=BUILDERS["classification"],
                                              builder_kwargs=CLS_KWARGS, epoch=0),
            "lung_seg": make_checkpoint(model={}, builder=BUILDERS["lung_seg"], builder_kwargs={}, epoch=0,
                                        task="lung_seg")}
    return {kind: save_checkpoint(ckpt, folder / f"{kind}.pth") for kind, ckpt in made.items()}


def script_argv(script: str, ckpt: Path, phantom: Path, save_dir: Path) -> list[str]:
    """Arguments that run ``script`` on the phantom's test data with ``ckpt``."""
    data = phantom / ("cls" if script == "evaluate_classifier" else "seg") / "test"
    return ["--ckpt", str(ckpt), "--test_data_dir", str(data), "--save_dir", str(save_dir)]


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("module", [evaluation_mean_ap, inference_segmentation])
@pytest.mark.parametrize("flag", ["--confidence_th", "--rpn_nms_th", "--roi_nms_th", "--mask_logits_th"])
@pytest.mark.parametrize("value", ["2", "-0.1", "nan"])
def test_segmentation_thresholds_outside_0_1_are_refused(module, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.get_args_parser().parse_args(["--ckpt", "x.pth", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must lie in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--rpn_nms_th", "--roi_nms_th"])
def test_classifier_thresholds_outside_0_1_are_refused_and_the_ends_accepted(flag, capsys):
    parser = evaluate_classifier.get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--ckpt", "x.pth", flag, "1.5"])
    assert "must lie in [0, 1]" in capsys.readouterr().err
    for value in ("0", "1"):
        assert getattr(parser.parse_args(["--ckpt", "x.pth", flag, value]), flag[2:]) == float(value)


@pytest.mark.parametrize("script,flag", [
    *(("evaluate_classifier", f) for f in ("--roi_batch_size", "--s_features", "--batch_size")),
    *(("train_classifier", f) for f in ("--roi_batch_size", "--s_features"))])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_sizes_below_one_are_refused(script, flag, value, capsys):
    """The model flags are declared once, in models.mask_net.workflows.cli.MODEL_FLAGS, for both classifier scripts."""
    required = ["--ckpt", "x.pth"] if script == "evaluate_classifier" else []
    with pytest.raises(SystemExit):
        importlib.import_module(script).get_args_parser().parse_args([*required, flag, value])
    assert f"argument {flag}: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--slices_per_patient", "0"], ["--workers", "0"], ["--image_size", "-1"],
                                  ["--volume_shape", "16", "0", "4"], ["--n_patients", "-1"]])
def test_phantom_sizes_and_counts_are_checked_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        make_synthetic_data.get_args_parser().parse_args(argv)
    assert f"argument {argv[0]}: must be" in capsys.readouterr().err


@pytest.mark.parametrize("script,wrong", WRONG_KINDS)
def test_a_checkpoint_of_another_kind_is_named_before_the_model_is_built(script, wrong, checkpoints, phantom,
                                                                         tmp_path):
    module, kind = SCRIPTS[script]
    path = checkpoints[wrong]
    args = module.get_args_parser().parse_args(script_argv(script, path, phantom, tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {MESSAGES[kind]}; it was built by {BUILDERS[wrong]}")):
        module.main(args)


@pytest.mark.parametrize("script,wrong", [("evaluation_mean_ap", "classification"),
                                          ("inference_segmentation", "lung_seg"),
                                          ("evaluate_classifier", "segmentation")])
def test_wrong_checkpoint_kind_is_one_error_line_without_traceback(script, wrong, checkpoints, phantom, tmp_path):
    out = run_script(f"{script}.py", *script_argv(script, checkpoints[wrong], phantom, tmp_path))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(checkpoints[wrong]) in errors[0], out.stderr
    assert MESSAGES[SCRIPTS[script][1]] in errors[0]


@pytest.mark.parametrize("argv,named", [
    (["evaluate_classifier.py", "--ckpt", "{tmp}/empty.pth"], "{tmp}/empty.pth: the checkpoint file is empty"),
    (["validate_volumetric.py", "--task", "lesion_seg", "--ckpt", "{tmp}/missing.pth", "--datalist", "{tmp}/d.json"],
     "checkpoint not found: {tmp}/missing.pth"),
    (["convert_checkpoint.py", "{tmp}/missing.pth", "{tmp}/new.pth"], "{tmp}/missing.pth"),
    (["make_synthetic_data.py", "--out", "{tmp}/empty.pth", "--outputs", "seg", "--no_montage"], "{tmp}/empty.pth"),
], ids=["evaluate_classifier", "validate_volumetric", "convert_checkpoint", "make_synthetic_data"])
def test_bad_files_are_one_error_line_without_traceback(argv, named, tmp_path):
    (tmp_path / "empty.pth").touch()
    out = run_script(*(a.format(tmp=tmp_path) for a in argv))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named.format(tmp=tmp_path) in errors[0], out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = run_script("evaluation_mean_ap.py", "--ckpt", str(tmp_path / "missing.pth"), "--debug")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "FileNotFoundError: checkpoint not found" in out.stderr
