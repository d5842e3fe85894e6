"""The one mixed-precision policy (utils.amp) and --amp in every trainer, on CPU (bfloat16)."""
import json

import pytest
import torch

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
