"""The pretrained-model manifest: verify (like sha256sum -c), register, resolve, and the committed file."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    make_checkpoint,
    resolve_builder,
    save_checkpoint,
)
from utils.manifest import MissingModelError, load_manifest, register, resolve_model, sha256_file, verify

ROOT = Path(__file__).resolve().parents[1]
BUILDER = "models.volumetric.lesion_seg.build_network"
KWARGS = {"in_channels": 1, "out_channels": 2, "init_filters": 8}


def _checkpoint(path: Path, seed: int = 0, task: str = "lesion_seg") -> Path:
    torch.manual_seed(seed)
    model = resolve_builder(BUILDER)(**KWARGS)
    return save_checkpoint(make_checkpoint(model=model, builder=BUILDER, builder_kwargs=KWARGS, epoch=3,
                                           task=task, task_config={}), path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.manifest", *args], cwd=ROOT, capture_output=True, text=True)


def test_register_then_verify_ok_failed_missing(tmp_path):
    models = tmp_path / "models"
    entry = register(models, name="lesion_seg", ckpt=_checkpoint(tmp_path / "a.pth"), metrics={"dice": 0.5},
                     data="phantom", command="python train_volumetric.py --task lesion_seg")
    assert entry["builder"] == BUILDER and entry["builder_kwargs"] == KWARGS and entry["task"] == "lesion_seg"
    assert entry["sha256"] == sha256_file(models / "lesion_seg.pth")
    assert verify(models) == [{"name": "lesion_seg", "file": "lesion_seg.pth", "status": "OK"}]
    assert resolve_model(models, "lesion_seg") == models / "lesion_seg.pth"
    rebuilt = build_model_from_checkpoint(load_checkpoint(resolve_model(models, "lesion_seg")))
    torch.manual_seed(0)
    reference = resolve_builder(BUILDER)(**KWARGS)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), reference.state_dict().values()))
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
    from models.mask_net.covid_mask_net import SEGMENTATION_BUILDER

    kwargs = dict(backbone_name="resnet18", truncation=2, num_classes=2, min_size=64, max_size=64)
    path = save_checkpoint(make_checkpoint(model=maskrcnn_resnet_fpn(**kwargs), builder=SEGMENTATION_BUILDER,
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
    with pytest.raises(MissingModelError) as err:
        resolve_model(tmp_path, "lung_seg")
    message = str(err.value)
    assert message.startswith("lung_seg: no manifest.json") and str(tmp_path / "manifest.json") in message
    assert f"python -m utils.manifest register {tmp_path} --name lung_seg --ckpt" in message
    shutil.copy(ROOT / "pretrained_models" / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(MissingModelError) as err:
        resolve_model(tmp_path, "lung_seg")
    message = str(err.value)
    assert f"lung_seg: {tmp_path / 'lung_seg.pth'} does not exist" in message
    assert message.index("train_volumetric.py --task lung_seg") < message.index("utils.manifest register")
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(MissingModelError, match=r"unknown: no such entry .* \(it lists \['mask_net_segmentation'"):
        resolve_model(tmp_path, "unknown")


def test_unreleased_entry_verifies_only_under_strict(tmp_path):
    (tmp_path / "manifest.json").write_text(_manifest_text())
    assert verify(tmp_path) == [{"name": "a", "file": "a.pth", "status": "UNRELEASED"}]
    assert _cli("verify", str(tmp_path)).returncode == 0
    strict = _cli("verify", str(tmp_path), "--strict")
    assert strict.returncode == 1 and strict.stdout.strip() == "a.pth: UNRELEASED"
    _checkpoint(tmp_path / "a.pth")  # a file dropped in without registering: nothing to check it against
    assert verify(tmp_path)[0]["status"] == "UNRELEASED" and resolve_model(tmp_path, "a") == tmp_path / "a.pth"
    assert "present but has no sha256" in _cli("verify", str(tmp_path)).stderr


def test_missing_file_fails_only_under_strict(tmp_path):
    register(tmp_path, name="lesion_seg", ckpt=_checkpoint(tmp_path / "run" / "best.pth"))
    (tmp_path / "lesion_seg.pth").unlink()
    lenient, strict = _cli("verify", str(tmp_path)), _cli("verify", str(tmp_path), "--strict")
    assert lenient.returncode == 0 and lenient.stdout.strip() == "lesion_seg.pth: MISSING"
    assert strict.returncode == 1 and "1 of 1 files did not verify" in strict.stderr


def test_register_copies_or_hard_links(tmp_path):
    source = _checkpoint(tmp_path / "best.pth")
    register(tmp_path / "copied", name="lesion_seg", ckpt=source)
    register(tmp_path / "linked", name="lesion_seg", ckpt=source, copy=False)
    inode = os.stat(source).st_ino
    assert os.stat(tmp_path / "copied" / "lesion_seg.pth").st_ino != inode
    assert os.stat(tmp_path / "linked" / "lesion_seg.pth").st_ino == inode
    again = register(tmp_path / "linked", name="lesion_seg", ckpt=tmp_path / "linked" / "lesion_seg.pth")
    assert again["sha256"] == sha256_file(source)  # registering the folder's own file in place
    assert sorted(p.name for p in (tmp_path / "linked").iterdir()) == ["lesion_seg.pth", "manifest.json"]


def test_register_rejects_bad_inputs_naming_them(tmp_path):
    models = tmp_path / "models"
    register(models, name="lung_seg", ckpt=_checkpoint(tmp_path / "a.pth", task="lung_seg"), command="cmd")
    lesion = _checkpoint(tmp_path / "lesion.pth")
    with pytest.raises(ValueError, match=r"lesion.pth: a 'lesion_seg' checkpoint cannot be registered as 'lung_seg', "
                                         r"whose task in .*manifest.json is 'lung_seg'"):
        register(models, name="lung_seg", ckpt=lesion)
    with pytest.raises(ValueError, match=r"model name must be .* got '../x'"):
        register(models, name="../x", ckpt=lesion)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pth"):
        register(models, name="b", ckpt=tmp_path / "nothing.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: cannot be read"):
        register(models, name="b", ckpt=tmp_path / "notes.pth")
    assert [e["name"] for e in load_manifest(models)["models"]] == ["lung_seg"]


def test_cli_errors_exit_2_with_a_message(tmp_path):
    no_manifest = _cli("verify", str(tmp_path))
    assert no_manifest.returncode == 2 and f"error: no manifest.json in {tmp_path}" in no_manifest.stderr
    (tmp_path / "metrics.json").write_text("[0.5]")
    bad_metrics = _cli("register", str(tmp_path / "m"), "--name", "lesion_seg", "--ckpt",
                       str(_checkpoint(tmp_path / "a.pth")), "--metrics", str(tmp_path / "metrics.json"))
    assert bad_metrics.returncode == 2 and "metrics.json: expected a JSON object, got list" in bad_metrics.stderr
    assert "Traceback" not in no_manifest.stderr + bad_metrics.stderr
    assert not (tmp_path / "m" / "manifest.json").exists()


GOOD_ENTRY = {"name": "a", "task": "lesion_seg", "builder": BUILDER, "builder_kwargs": {}, "file": "a.pth",
              "sha256": None, "metrics": None, "data": None, "command": None, "description": ""}


def _manifest_text(**changes) -> str:
    return json.dumps({"schema_version": 1, "models": [{**GOOD_ENTRY, **changes}]})


@pytest.mark.parametrize("text,match", [
    ("{", "not valid JSON"),
    ('{"schema_version": 1, "models": 3}', "expected"),
    ('{"models": []}', "schema_version must be an integer 1..1, got None"),
    ('{"schema_version": 2, "models": []}', "schema_version must be an integer 1..1, got 2"),
    ('{"schema_version": 1, "models": [{"name": "a"}]}', r"entry 0 \('a'\) lacks keys \['task'"),
    ('{"schema_version": 1, "models": [7]}', r"entry 0 \(not an object\) lacks keys"),
    (_manifest_text(sha256="abc"), r"entry 0 \('a'\): sha256 must be 64 lowercase hex digits or null, got 'abc'"),
    (_manifest_text(file="../elsewhere.pth"), "file must be a path inside the manifest's folder"),
    (_manifest_text(file="/tmp/a.pth"), "file must be a path inside the manifest's folder"),
    (_manifest_text(metrics=[0.5]), "metrics must be an object or null"),
    (_manifest_text(builder_kwargs=None, name=""), "name must be a non-empty string; builder_kwargs must be an object"),
    (json.dumps({"schema_version": 1, "models": [GOOD_ENTRY, GOOD_ENTRY]}), "model name 'a' appears twice"),
])
def test_malformed_manifest_is_named(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value)


def test_committed_manifest_lists_the_five_models_with_resolvable_builders():
    manifest = load_manifest(ROOT / "pretrained_models")
    names = [e["name"] for e in manifest["models"]]
    assert names == ["mask_net_segmentation", "mask_net_classifier", "lung_seg", "lesion_seg", "covid_cls"]
    for entry in manifest["models"]:
        builder = resolve_builder(entry["builder"])
        assert callable(builder) and entry["command"].startswith("python ")
    statuses = {row["status"] for row in verify(ROOT / "pretrained_models")}
    assert statuses <= {"UNRELEASED", "OK"}


def test_committed_builder_kwargs_are_what_the_commands_save():
    """Each entry's command parses with its script's parser, and the script saves exactly the entry's builder_kwargs."""
    import train_classifier
    import train_segmentation
    import train_volumetric
    from models.mask_net.workflows.classifier import ClassifierTrainConfig, classifier_kwargs_from_segmentation
    from models.mask_net.workflows.segmentation import SegmentationTrainConfig, segmentation_builder_kwargs
    from models.volumetric import cli as volumetric_cli
    from models.volumetric import get_task
    from models.volumetric.trainer import network_overrides
    from utils.cli import config_from_args

    entries = {e["name"]: e for e in load_manifest(ROOT / "pretrained_models")["models"]}
    argv = {name: shlex.split(e["command"])[2:] for name, e in entries.items()}
    seg = train_segmentation.get_args_parser().parse_args(argv["mask_net_segmentation"])
    seg_kwargs = segmentation_builder_kwargs(config_from_args(SegmentationTrainConfig, seg))
    assert seg_kwargs == entries["mask_net_segmentation"]["builder_kwargs"]
    cls = train_classifier.get_args_parser().parse_args(argv["mask_net_classifier"])
    expected = entries["mask_net_classifier"]["builder_kwargs"]
    assert classifier_kwargs_from_segmentation(config_from_args(ClassifierTrainConfig, cls), seg_kwargs) == expected
    for name in ("lung_seg", "lesion_seg", "covid_cls"):
        args = train_volumetric.get_args_parser().parse_args(argv[name])
        task = get_task(args.task)
        settings = volumetric_cli.train_settings(args)
        config = task.make_config(**settings.config)
        kwargs = {**task.network_kwargs, **network_overrides(task, config, settings.network)}
        assert (task.name, task.builder, kwargs) == (name, entries[name]["builder"], entries[name]["builder_kwargs"])
