"""The one mixed-precision policy (utils.amp) and --amp in every trainer and 2D inference script, on CPU (bfloat16)."""
import json

import pytest
import torch

import evaluate_classifier
import evaluation_mean_ap
import inference_segmentation
import train_classifier
import train_segmentation
import train_volumetric
from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.workflows import classifier as classifier_workflow
from tests.helpers import write_datalist, write_slice_phantom
from utils import amp
from utils.checkpoint import SEGMENTATION_BUILDER, load_checkpoint, make_checkpoint, save_checkpoint
from utils.training import resume_training

CPU = torch.device("cpu")
SEG_KWARGS = dict(backbone_name="resnet18", truncation=1, num_classes=2, min_size=64, max_size=64)


@pytest.mark.parametrize("bf16_gpu, expected", [(True, "bf16"), (False, "fp16")])
def test_policy_picks_bfloat16_where_the_device_has_it(monkeypatch, bf16_gpu, expected):
    assert amp.precision(CPU, False) == "fp32" and amp.precision(CPU, True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    cuda = torch.device("cuda")
    assert amp.precision(cuda, True) == expected and amp.precision(cuda, False) == "fp32"


def test_only_float16_training_gets_a_loss_scaler(monkeypatch):
    assert amp.grad_scaler(CPU, True) is None and amp.grad_scaler(CPU, False) is None
    monkeypatch.setattr(amp, "precision", lambda device, on: "fp16" if on else "fp32")
    assert isinstance(amp.grad_scaler(CPU, True), torch.amp.GradScaler) and amp.grad_scaler(CPU, False) is None


def test_autocast_runs_bfloat16_on_cpu_only_when_asked():
    layer, x = torch.nn.Linear(4, 4), torch.rand(2, 4)
    with amp.autocast(CPU, True):
        assert layer(x).dtype == torch.bfloat16
    with amp.autocast(CPU, False):
        assert layer(x).dtype == torch.float32


def test_resume_restores_the_saved_loss_scale_and_says_when_there_is_none(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    saved = torch.amp.GradScaler("cpu", init_scale=64.0)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(make_checkpoint(model=model, builder="models.x", builder_kwargs={}, epoch=3,
                                    **amp.checkpoint_entries(saved, "fp16")), path)
    fresh = torch.amp.GradScaler("cpu")
    assert fresh.get_scale() == 65536.0
    start, _ = resume_training(str(path), model=torch.nn.Linear(2, 2), optimizer=None, run=None, builder="models.x",
                               kind="test", scaler=fresh)
    assert start == 4 and fresh.get_scale() == 64.0
    save_checkpoint(make_checkpoint(model=model, builder="models.x", builder_kwargs={}, epoch=0,
                                    **amp.checkpoint_entries(None, "bf16")), path)
    resume_training(str(path), model=torch.nn.Linear(2, 2), optimizer=None, run=None, builder="models.x",
                    kind="test", scaler=torch.amp.GradScaler("cpu"))
    assert "no saved loss scale, starting a fresh one" in capsys.readouterr().out


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_slice_phantom(tmp_path_factory.mktemp("phantom"), slices_per_patient=2)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_bf16_run(run):
    records = _records(run)
    assert records and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert ckpt["args"]["amp"] is True and ckpt["precision"] == "bf16" and ckpt["scaler"] is None
    return ckpt


def test_train_segmentation_amp_two_steps(phantom, tmp_path):
    train_segmentation.main(train_segmentation.get_args_parser().parse_args([
        "--num_epochs", "1", "--mask_type", "merge", "--backbone_name", "resnet18", "--truncation", "1",
        "--train_data_dir", str(phantom / "seg" / "train"), "--val_data_dir", str(phantom / "seg" / "val"),
        "--save_dir", str(tmp_path), "--image_size", "64", "--max_steps", "2", "--batch_size", "1",
        "--lrate", "1e-4", "--no_progress", "--amp"]))
    _check_bf16_run(tmp_path)


def _seg_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "seg.pth"
    save_checkpoint(make_checkpoint(model=maskrcnn_resnet_fpn(**SEG_KWARGS), builder=SEGMENTATION_BUILDER,
                                    builder_kwargs=SEG_KWARGS, epoch=0, mask_type="merge"), path)
    return path


def _classifier_argv(phantom, seg, save_dir, *extra):
    return ["--pretrained_segmentation_model", str(seg), "--train_data_dir", str(phantom / "cls" / "train"),
            "--val_data_dir", str(phantom / "cls" / "val"), "--batch_size", "1", "--max_steps", "2",
            "--roi_batch_size", "8", "--s_features", "16", "--lrate", "1e-3", "--save_dir", str(save_dir),
            "--no_progress", "--amp", *extra]


def test_train_classifier_amp_two_steps_and_resume_restores_the_scaler(phantom, tmp_path, monkeypatch):
    seg = _seg_checkpoint(tmp_path)
    parse = train_classifier.get_args_parser().parse_args
    train_classifier.main(parse(_classifier_argv(phantom, seg, tmp_path / "a", "--num_epochs", "1")))
    _check_bf16_run(tmp_path / "a")
    # A float16 run keeps a loss scale; stand in a CPU scaler for the GPU's and check that resume brings it back.
    scalers = []

    def scaler_with(scale):
        def make(device, on):
            scalers.append(torch.amp.GradScaler("cpu", init_scale=scale))
            return scalers[-1]
        return make

    monkeypatch.setattr(classifier_workflow, "grad_scaler", scaler_with(512.0))
    train_classifier.main(parse(_classifier_argv(phantom, seg, tmp_path / "b", "--num_epochs", "1")))
    assert load_checkpoint(tmp_path / "b" / "checkpoint_last.pth")["scaler"]["scale"] == 512.0
    monkeypatch.setattr(classifier_workflow, "grad_scaler", scaler_with(65536.0))
    train_classifier.main(parse(_classifier_argv(phantom, seg, tmp_path / "c", "--num_epochs", "2", "--resume",
                                                 str(tmp_path / "b" / "checkpoint_last.pth"))))
    assert scalers[-1].get_scale() == 512.0, "the resumed run continues with the saved loss scale"
    assert [r["epoch"] for r in _records(tmp_path / "c")] == [1]


def test_train_volumetric_amp_two_steps(tmp_path):
    datalist = write_datalist(tmp_path / "data", label="lesion", n_train=2, n_val=1)
    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        ["--task", "lesion_seg", "--datalist", str(datalist), "--epochs", "2", "--batch_size", "1",
         "--save_dir", str(tmp_path / "run"), "--roi_size", "32", "32", "16", "--spacing", "2", "2", "4", "--amp"]))
    _check_bf16_run(tmp_path / "run")


def test_for_inference_runs_under_autocast_and_hands_back_float32():
    layer, x = torch.nn.Linear(4, 4), torch.rand(2, 4)
    assert amp.for_inference(layer, CPU, False) is layer
    wrapped = amp.for_inference(layer, CPU, True)
    inner = []
    layer.register_forward_hook(lambda module, args, out: inner.append(out.dtype))
    out = wrapped(x)
    assert inner == [torch.bfloat16] and out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x), atol=0.05, rtol=0.05)
    assert wrapped.out_features == 4, "other attributes are the wrapped module's"


def test_mask_rcnn_under_autocast_gives_float32_detections():
    torch.manual_seed(0)
    model = maskrcnn_resnet_fpn(**SEG_KWARGS).eval()
    with torch.inference_mode(), amp.autocast(CPU, True):
        detections = model([torch.rand(3, 64, 64)])[0]
    assert detections["masks"].shape[-2:] == (64, 64) and len(detections["scores"]) > 0
    assert {k: v.dtype for k, v in detections.items()} == {
        "boxes": torch.float32, "scores": torch.float32, "labels": torch.int64, "masks": torch.float32}


def test_segmentation_inference_and_evaluation_scripts_run_with_amp(phantom, tmp_path):
    seg = str(_seg_checkpoint(tmp_path))
    test = str(phantom / "seg" / "test")
    inference_segmentation.main(inference_segmentation.get_args_parser().parse_args(
        ["--ckpt", seg, "--test_data_dir", test, "--save_dir", str(tmp_path / "inf"), "--amp"]))
    predictions = json.loads((tmp_path / "inf" / "predictions.json").read_text())
    assert predictions and all(0.0 <= p["score"] <= 1.0 for p in predictions)
    evaluation_mean_ap.main(evaluation_mean_ap.get_args_parser().parse_args(
        ["--ckpt", seg, "--test_data_dir", test, "--save_dir", str(tmp_path / "ap"), "--amp"]))
    assert "segm" in json.loads((tmp_path / "ap" / "metrics.json").read_text())


def test_evaluate_classifier_runs_with_amp(phantom, tmp_path):
    parse = train_classifier.get_args_parser().parse_args
    argv = [a for a in _classifier_argv(phantom, _seg_checkpoint(tmp_path), tmp_path / "run", "--num_epochs", "1")
            if a != "--amp"]
    train_classifier.main(parse(argv))
    evaluate_classifier.main(evaluate_classifier.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "run" / "checkpoint_last.pth"), "--test_data_dir", str(phantom / "cls" / "test"),
         "--save_dir", str(tmp_path / "eval"), "--no_progress", "--amp"]))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["slice"]["accuracy"] <= 1.0
