"""convert_checkpoint.py: original COVID-CT-Mask-Net checkpoints -> this project's schema, read safely.

The fixtures imitate the original's files: our model's weights renamed to torchvision 0.3's names
(by this file's own renaming, written independently of the converter's rules), a pickled
``AnchorGenerator`` of a class living at ``models.mask_net.rpn`` / ``rpn_segmentation`` (a fake
module that exists only while the file is written), torch 1.1's ``_backend`` reference, an Adam
state, and ``epoch`` as a string, in torch 1.1's legacy format or the zip format.
"""
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.backends.thnn
from torch import nn

import convert_checkpoint
import inference_segmentation
from datasets.synthetic import generate_dataset
from models.mask_net import covid_mask_net
from models.mask_net.legacy import LegacyAnchorGenerator, map_key, read_legacy_file
from models.mask_net.workflows.classifier_evaluation import load_classifier
from models.mask_net.workflows.model_io import load_model_for_inference
from tests.helpers import CLS_MODULE, RATIOS, SEG_MODULE, SIZES, old_name, seg_model, write_original
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]










def convert(old: Path, new: Path, *extra: str) -> Path:
    return convert_checkpoint.main(convert_checkpoint.get_args_parser().parse_args([str(old), str(new), *extra]))




def assert_same_weights(ours: dict, source: nn.Module) -> None:
    expected = source.state_dict()
    assert list(ours) == list(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("legacy_format", [True, False], ids=["torch1.1-format", "zip-format"])
def test_resnet18_truncation1_segmentation_round_trip(tmp_path, capsys, legacy_format):
    source = seg_model()
    old = write_original(tmp_path / "old.pth", source, legacy_format=legacy_format)
    assert SEG_MODULE not in sys.modules  # the converter cannot lean on the fake module
    new = convert(old, tmp_path / "new.pth")
    ckpt = load_checkpoint(new)
    assert_same_weights(ckpt["model"], source)
    assert ckpt["builder"] == "models.mask_net.maskrcnn_resnet_fpn"
    assert ckpt["builder_kwargs"] == {"backbone_name": "resnet18", "truncation": 1, "num_classes": 3}
    assert ckpt["optimizer"] is None and ckpt["epoch"] == 19 and ckpt["mask_type"] == "both"
    assert ckpt["class_names"] == ["background", "GGO", "consolidation"]
    assert ckpt["args"] == {"converted_from": str(old.resolve()), "original_model_name": "original_model",
                            "original_lrate": 1e-5, "original_epoch": "20"}
    out = capsys.readouterr().out
    assert "backbone: resnet18" in out and "truncation 1" in out and "num_classes: 3" in out
    assert f"pickled {SEG_MODULE}.AnchorGenerator (equal to our defaults)" in out


def test_converted_segmentation_loads_and_predicts_like_the_source(tmp_path):
    source = seg_model()
    new = convert(write_original(tmp_path / "old.pth", source), tmp_path / "new.pth")
    model, _ = load_model_for_inference(str(new), device=torch.device("cpu"), flags={})
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        expected, got = source(image)[0], model(image)[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(expected[key], got[key]), key


def test_inference_script_runs_on_a_converted_checkpoint(tmp_path):
    root = tmp_path / "phantom"
    generate_dataset(root, seed=1, n_seg_patients=3, slices_per_patient=1, image_size=64, outputs=("seg",),
                     montage=False)
    model = seg_model(num_classes=2)
    new = convert(write_original(tmp_path / "old.pth", model), tmp_path / "new.pth", "--mask_type", "ggo")
    assert load_checkpoint(new)["class_names"] == ["background", "GGO"]
    args = inference_segmentation.get_args_parser().parse_args([
        "--ckpt", str(new), "--test_data_dir", str(root / "seg" / "test"), "--save_dir", str(tmp_path / "out")])
    assert inference_segmentation.main(args).is_file()


@pytest.mark.parametrize("b,s_features", [(128, 512), (256, 1024)])
def test_classifier_with_s2new_round_trip_and_evaluate_loader(tmp_path, capsys, b, s_features):
    torch.manual_seed(0)
    source = covid_mask_net(backbone_name="resnet34", truncation=2, num_classes=2, roi_batch_size=b,
                            s_features=s_features).eval()
    old = write_original(tmp_path / "old.pth", source, anchor_module=CLS_MODULE, epoch="7")
    assert any(old_name(k).startswith("s2new.fc_scores_img.") for k in source.state_dict())
    new = convert(old, tmp_path / "new.pth", "--mask_type", "merge")  # ignored for a classifier
    ckpt = load_checkpoint(new)
    assert_same_weights(ckpt["model"], source)
    assert ckpt["builder"] == "models.mask_net.covid_mask_net" and ckpt["epoch"] == 6
    assert ckpt["builder_kwargs"] == {"backbone_name": "resnet34", "truncation": 2, "num_classes": 2,
                                      "roi_batch_size": b, "s_features": s_features}
    assert f"B (roi_batch_size) = {b}, s_features = {s_features}" in capsys.readouterr().out
    model, _ = load_classifier(str(new), flags={}, device=torch.device("cpu"))
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))]
    with torch.inference_mode():  # the loaded model pools by gathers on CPU: equal to float rounding
        torch.testing.assert_close(model(images), source(images), rtol=1e-5, atol=1e-6)


def test_resnet50_segmentation(tmp_path):
    start = time.perf_counter()
    source = seg_model(backbone_name="resnet50", truncation=0, num_classes=2)
    ckpt = load_checkpoint(convert(write_original(tmp_path / "old.pth", source), tmp_path / "new.pth"))
    assert_same_weights(ckpt["model"], source)
    assert ckpt["builder_kwargs"] == {"backbone_name": "resnet50", "truncation": 0, "num_classes": 2}
    assert ckpt["mask_type"] == "merge"
    assert time.perf_counter() - start < 30


def test_pickled_anchor_generator_becomes_a_stand_in_with_sizes_only(tmp_path):
    data = read_legacy_file(write_original(tmp_path / "old.pth", seg_model()))
    generator = data["anchor_generator"]
    assert isinstance(generator, LegacyAnchorGenerator) and generator.source == f"{SEG_MODULE}.AnchorGenerator"
    assert vars(generator) == {"sizes": SIZES, "aspect_ratios": RATIOS}
    assert data["epoch"] == "20" and data["optimizer_state"]["param_groups"][0]["lr"] == 1e-5


def test_other_anchors_become_builder_overrides(tmp_path):
    source = seg_model(anchor_sizes=(4, 8, 16), aspect_ratios=(0.5, 1.0, 2.0))
    old = write_original(tmp_path / "old.pth", source, sizes=((4, 8, 16),) * 5, ratios=((0.5, 1, 2),) * 5)
    ckpt = load_checkpoint(convert(old, tmp_path / "new.pth"))
    assert ckpt["builder_kwargs"]["anchor_sizes"] == [4, 8, 16]
    assert ckpt["builder_kwargs"]["aspect_ratios"] == [0.5, 1, 2]
    rebuilt = build_model_from_checkpoint(ckpt)
    assert rebuilt.rpn.anchor_generator.sizes == ((4, 8, 16),)
    assert torch.equal(rebuilt.rpn.anchor_generator.cells[0], source.rpn.anchor_generator.cells[0])


def test_without_anchor_generator_the_defaults_are_used_when_counts_fit(tmp_path, capsys):
    convert(write_original(tmp_path / "old.pth", seg_model(), anchor_module=None), tmp_path / "new.pth")
    assert "defaults (the file has no anchor_generator)" in capsys.readouterr().out
    odd = seg_model(anchor_sizes=(4, 8), aspect_ratios=(1.0,))
    with pytest.raises(ValueError, match=r"old2\.pth.*\[30\] anchors per position.*RPN head predicts 2"):
        convert(write_original(tmp_path / "old2.pth", odd, anchor_module=None), tmp_path / "new2.pth")


def test_anchor_generator_that_contradicts_the_rpn_head_is_refused(tmp_path):
    old = write_original(tmp_path / "old.pth", seg_model(), sizes=((4, 8, 16),) * 5, ratios=((1.0,),) * 5)
    with pytest.raises(ValueError, match=r"old\.pth.*\[3\] anchors per position.*RPN head predicts 30"):
        convert(old, tmp_path / "new.pth")


def test_absent_num_batches_tracked_are_filled(tmp_path, capsys):
    source = seg_model()
    weights = collections.OrderedDict((old_name(k), v) for k, v in source.state_dict().items()
                                      if not k.endswith("num_batches_tracked"))
    ckpt = load_checkpoint(convert(write_original(tmp_path / "old.pth", source, weights=weights), tmp_path / "n.pth"))
    assert_same_weights(ckpt["model"], source)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in source.modules())
    assert f"filled {norms} absent BatchNorm num_batches_tracked with 0" in capsys.readouterr().out


@pytest.mark.parametrize("old,new", [
    ("backbone.fpn.inner_blocks.0.weight", "backbone.fpn.inner_blocks.0.0.weight"),
    ("backbone.fpn.layer_blocks.3.bias", "backbone.fpn.layer_blocks.3.0.bias"),
    ("rpn.head.conv.weight", "rpn.head.conv.0.0.weight"),
    ("roi_heads.mask_head.mask_fcn4.bias", "roi_heads.mask_head.3.0.bias"),
    ("s2new.fc_scores_2.weight", "s_module.2.weight"),
    ("backbone.body.layer3.5.downsample.1.running_var", "backbone.body.layer3.5.downsample.1.running_var"),
    ("backbone.body.fc.weight", None), ("roi_heads.mask_head.mask_fcn0.weight", None), ("s2new.other.weight", None),
])
def test_key_rules(old, new):
    assert map_key(old) == new


def _malicious_payloads(marker: Path) -> dict:
    class System:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class Eval:
        def __reduce__(self):
            return eval, (f"open({str(marker)!r}, 'w').close()",)

    return {"posix.system": System(), "builtins.eval": Eval()}


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, name):
    marker = tmp_path / "executed"
    old = tmp_path / "evil.pth"
    torch.save({"model_weights": {"x": torch.zeros(1)}, "anchor_generator": _malicious_payloads(marker)[name]}, old)
    torch.load(old, weights_only=False)  # control: an unrestricted load runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=rf"evil\.pth: refused to unpickle the global {re.escape(name)}"):
        convert(old, tmp_path / "new.pth")
    assert not marker.exists() and not (tmp_path / "new.pth").exists()


def test_a_file_holding_another_pickled_object_is_refused(tmp_path):
    whole_model = tmp_path / "model.pth"
    torch.save(seg_model(), whole_model)
    with pytest.raises(ValueError, match=r"model\.pth: refused to unpickle the global models\.mask_net\.mask_rcnn\."
                                         r"MaskRCNN"):
        convert(whole_model, tmp_path / "new.pth")
    counter = tmp_path / "counter.pth"
    torch.save({"model_weights": {"x": torch.zeros(1)}, "extra": collections.Counter("ab")}, counter)
    with pytest.raises(ValueError, match=r"counter\.pth: refused to unpickle the global collections\.Counter"):
        convert(counter, tmp_path / "new.pth")


@pytest.mark.parametrize("content,message", [
    ([1, 2], r"expected a dict with 'model_weights', got a list"),
    (torch.zeros(3), r"expected a dict with 'model_weights', got a Tensor"),
    ({"state_dict": {"a": torch.zeros(1)}}, r"no 'model_weights' state dict \(keys: \['state_dict'\]\)"),
    ({"model_weights": {"a": 1}}, r"'model_weights' must map names to tensors; bad entries \['a'\]"),
])
def test_files_that_are_not_original_checkpoints(tmp_path, content, message):
    torch.save(content, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: " + message):
        convert(tmp_path / "bad.pth", tmp_path / "new.pth")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"original checkpoint not found: .*nope\.pth"):
        convert(tmp_path / "nope.pth", tmp_path / "new.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pth: cannot be read as a torch.save'd checkpoint"):
        convert(tmp_path / "text.pth", tmp_path / "new.pth")


def test_unknown_key_layout_names_the_keys(tmp_path):
    weights = collections.OrderedDict((old_name(k), v) for k, v in seg_model().state_dict().items())
    weights["roi_heads.keypoint_head.conv.weight"] = torch.zeros(1)
    old = write_original(tmp_path / "old.pth", seg_model(), weights=weights)
    with pytest.raises(ValueError, match=r"old\.pth: unknown key layout; 1 keys .*'roi_heads\.keypoint_head\.conv\."):
        convert(old, tmp_path / "new.pth")


def test_inconsistent_shapes_and_unknown_backbones_are_refused(tmp_path):
    weights = collections.OrderedDict((old_name(k), v) for k, v in seg_model().state_dict().items())
    weights["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(8, 128)  # 2 classes, cls_score says 3
    with pytest.raises(ValueError, match=r"shape \(file vs model\): \['roi_heads\.box_predictor\.bbox_pred\.weight "
                                         r"\(8, 128\) vs \(12, 128\)'\]"):
        convert(write_original(tmp_path / "a.pth", seg_model(), weights=weights), tmp_path / "new.pth")
    weights = collections.OrderedDict((old_name(k), v) for k, v in seg_model().state_dict().items())
    weights.update({k.replace("layer1.1.", "layer1.7."): v for k, v in weights.items() if "layer1.1." in k})
    with pytest.raises(ValueError, match=r"b\.pth: the ResNet body \(basic blocks, \(3, 2, 2\) blocks"):
        convert(write_original(tmp_path / "b.pth", seg_model(), weights=weights), tmp_path / "new.pth")


def test_mask_type_must_fit_the_classes_and_new_is_not_overwritten(tmp_path):
    old = write_original(tmp_path / "old.pth", seg_model())
    with pytest.raises(ValueError, match=r"old\.pth: the model has 3 classes .*mask_type 'merge' does not fit"):
        convert(old, tmp_path / "new.pth", "--mask_type", "merge")
    (tmp_path / "new.pth").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        convert(old, tmp_path / "new.pth")
    assert (tmp_path / "new.pth").read_bytes() == b"keep"
    with pytest.raises(ValueError, match="NEW must differ from OLD"):
        convert(old, old, "--overwrite")
    convert(old, tmp_path / "new.pth", "--overwrite")
    assert load_checkpoint(tmp_path / "new.pth")["epoch"] == 19


def test_help_names_every_default():
    out = subprocess.run([sys.executable, "convert_checkpoint.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "python convert_checkpoint.py" in out and out.count("default:") >= 2


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archives_are_refused_before_torch_jit_load(tmp_path):
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pth")
    with pytest.raises(ValueError, match=r"scripted\.pth: a TorchScript archive"):
        convert(tmp_path / "scripted.pth", tmp_path / "new.pth")


@pytest.mark.parametrize("field,message", [
    ({"epoch": "last"}, r"'epoch' must be a non-negative whole number of epochs, got 'last'"),
    ({"anchor_generator": {"sizes": (2,)}}, r"'anchor_generator' is a dict, not an AnchorGenerator"),
])
def test_bad_epoch_and_anchor_generator_fields(tmp_path, field, message):
    old = write_original(tmp_path / "old.pth", seg_model(), anchor_module=None, **field)
    with pytest.raises(ValueError, match=r"old\.pth: " + message):
        convert(old, tmp_path / "new.pth")
