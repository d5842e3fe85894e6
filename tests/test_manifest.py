"""The pretrained-model manifest: verify (like sha256sum -c), register, resolve, and the committed file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.checkpoint import make_checkpoint, resolve_builder, save_checkpoint
from utils.manifest import MissingModelError, load_manifest, register, resolve_model, sha256_file, verify

ROOT = Path(__file__).resolve().parents[1]
BUILDER = "models.volumetric.lesion_seg.build_network"
KWARGS = {"in_channels": 1, "out_channels": 2, "init_filters": 8}


def _checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = resolve_builder(BUILDER)(**KWARGS)
    return save_checkpoint(make_checkpoint(model=model, builder=BUILDER, builder_kwargs=KWARGS, epoch=3,
                                           task="lesion_seg", task_config={}), path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.checkpoint", *args], cwd=ROOT, capture_output=True, text=True)


def test_register_then_verify_ok_failed_missing(tmp_path):
    models = tmp_path / "models"
    entry = register(models, name="lesion_seg", ckpt=_checkpoint(tmp_path / "a.pth"), metrics={"dice": 0.5},
                     data="phantom", command="python train_volumetric.py --task lesion_seg")
    assert entry["builder"] == BUILDER and entry["builder_kwargs"] == KWARGS and entry["task"] == "lesion_seg"
    assert entry["sha256"] == sha256_file(models / "lesion_seg.pth")
    assert verify(models) == [{"name": "lesion_seg", "file": "lesion_seg.pth", "status": "OK"}]
    assert resolve_model(models, "lesion_seg") == models / "lesion_seg.pth"
    _checkpoint(models / "lesion_seg.pth", seed=1)  # same name, other weights
    assert verify(models)[0]["status"] == "FAILED"
    with pytest.raises(ValueError, match="does not match the sha256"):
        resolve_model(models, "lesion_seg")
    (models / "lesion_seg.pth").unlink()
    assert verify(models)[0]["status"] == "MISSING"


def test_register_updates_the_entry_and_keeps_other_fields(tmp_path):
    models = tmp_path / "models"
    register(models, name="lesion_seg", ckpt=_checkpoint(tmp_path / "a.pth"), data="phantom", command="cmd")
    register(models, name="lesion_seg", ckpt=_checkpoint(tmp_path / "b.pth", seed=2), metrics={"dice": 0.7})
    register(models, name="other", ckpt=_checkpoint(tmp_path / "c.pth"))
    manifest = load_manifest(models)
    assert [e["name"] for e in manifest["models"]] == ["lesion_seg", "other"]
    first = manifest["models"][0]
    assert first["data"] == "phantom" and first["command"] == "cmd" and first["metrics"] == {"dice": 0.7}
    assert first["sha256"] == sha256_file(tmp_path / "b.pth")


def test_register_names_the_task_of_a_2d_checkpoint(tmp_path):
    from models.mask_net import maskrcnn_resnet_fpn

    kwargs = dict(backbone_name="resnet18", truncation=2, num_classes=2, min_size=64, max_size=64)
    path = save_checkpoint(make_checkpoint(model=maskrcnn_resnet_fpn(**kwargs), builder="models.mask_net.maskrcnn_resnet_fpn",
                                           builder_kwargs=kwargs, epoch=0), tmp_path / "seg.pth")
    assert register(tmp_path / "models", name="mask_net_segmentation", ckpt=path)["task"] == "segmentation_2d"


def test_cli_exit_codes_and_lines(tmp_path):
    models = tmp_path / "models"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mean_dice": 0.4}))
    done = _cli("register", str(models), "--name", "lesion_seg", "--ckpt", str(_checkpoint(tmp_path / "a.pth")),
                "--metrics", str(metrics))
    assert done.returncode == 0, done.stderr
    assert load_manifest(models)["models"][0]["metrics"] == {"mean_dice": 0.4}
    ok = _cli("verify", str(models))
    assert ok.returncode == 0 and ok.stdout.strip() == "lesion_seg.pth: OK"
    (models / "lesion_seg.pth").write_bytes(b"tampered")
    failed = _cli("verify", str(models))
    assert failed.returncode == 1 and "lesion_seg.pth: FAILED" in failed.stdout


def test_missing_model_message_says_how_to_produce_it(tmp_path):
    with pytest.raises(MissingModelError, match="lung_seg: no manifest.json"):
        resolve_model(tmp_path, "lung_seg")
    with pytest.raises(MissingModelError) as err:
        resolve_model(ROOT / "pretrained_models", "lung_seg")
    message = str(err.value)
    assert "lung_seg.pth does not exist" in message and "train_volumetric.py --task lung_seg" in message
    assert "utils.checkpoint register" in message
    with pytest.raises(MissingModelError, match="no such entry"):
        resolve_model(ROOT / "pretrained_models", "unknown")


@pytest.mark.parametrize("text,match", [("{", "not valid JSON"), ('{"models": 3}', "expected"),
                                        ('{"models": [{"name": "a"}]}', r"entry 0 \('a'\) lacks keys")])
def test_malformed_manifest_is_named(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_manifest(tmp_path)


def test_committed_manifest_lists_the_five_models_with_resolvable_builders():
    manifest = load_manifest(ROOT / "pretrained_models")
    names = [e["name"] for e in manifest["models"]]
    assert names == ["mask_net_segmentation", "mask_net_classifier", "lung_seg", "lesion_seg", "covid_cls"]
    for entry in manifest["models"]:
        builder = resolve_builder(entry["builder"])
        assert callable(builder) and entry["command"].startswith("python ")
    statuses = {row["status"] for row in verify(ROOT / "pretrained_models")}
    assert statuses <= {"UNRELEASED", "OK"}
