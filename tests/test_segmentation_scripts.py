"""The 2D segmentation scripts end to end on a tiny phantom: train -> resume -> infer -> mAP."""
import json
import subprocess
import sys

import pytest
import torch

import evaluation_mean_ap
import inference_segmentation
import train_segmentation
from datasets.synthetic import generate_dataset
from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.fast.fusion import WinogradConv2d
from models.mask_net.workflows import MeanAPConfig, evaluate_mean_ap, loops
from models.mask_net.workflows.segmentation import (
    SegmentationInferenceConfig,
    SegmentationTrainConfig,
    load_segmentation_model,
    segmentation_builder_kwargs,
)
from utils.checkpoint import load_checkpoint
from utils.cli import config_from_args


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    generate_dataset(out, seed=1, n_seg_patients=3, slices_per_patient=2, image_size=64, outputs=("seg",),
                     montage=False)
    return out / "seg"


def _train_args(seg_root, save_dir, *extra):
    return train_segmentation.get_args_parser().parse_args([
        # the original README's command, shortened to one tiny epoch
        "--num_epochs", "1", "--mask_type", "merge", "--save_every", "1", "--backbone_name", "resnet18",
        "--truncation", "1", "--device", "cpu",
        "--train_data_dir", str(seg_root / "train"), "--val_data_dir", str(seg_root / "val"),
        "--save_dir", str(save_dir), "--image_size", "64", "--max_steps", "2", "--batch_size", "2",
        "--lrate", "1e-4", "--no_progress", *extra])


@pytest.fixture(scope="module")
def trained(seg_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train_segmentation.main(_train_args(seg_root, run_dir))
    return run_dir


def test_training_writes_the_run_directory(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"args.json", "env.txt", "metrics.jsonl", "checkpoint_last.pth", "checkpoint_best.pth",
            "mrcnn_covid_segmentation_model_ckpt_1.pth"} <= names
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 0 and record["train_loss"] > 0 and record["val_loss"] > 0
    ckpt = load_checkpoint(trained / "checkpoint_last.pth")
    assert ckpt["builder_kwargs"]["truncation"] == 1 and ckpt["mask_type"] == "merge"
    assert ckpt["builder_kwargs"]["num_classes"] == 2


def test_training_logs_the_diagnostics_and_keeps_the_best_by_mask_map(trained):
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("train_rpn_pos_fraction", "train_roi_pos_fraction", "val_rpn_recall50", "val_rpn_recall75",
                "val_segm_AP50", "val_segm_mAP"):
        assert 0.0 <= record[key] <= 1.0, key
    assert record["val_loss"] > 0
    best = load_checkpoint(trained / "checkpoint_best.pth")
    assert best["best"] == {"metric": "val_segm_mAP", "higher_is_better": True, "value": record["val_segm_mAP"],
                            "epoch": 0}


def test_sampling_flags_reach_the_checkpoint_and_the_rebuilt_model(seg_root, tmp_path):
    args = _train_args(seg_root, tmp_path, "--rpn_fg_iou_th", "0.6", "--rpn_bg_iou_th", "0.2", "--roi_fg_iou_th",
                       "0.5", "--roi_bg_iou_th", "0.4", "--anchor_sizes", "4", "8", "16", "--mask_overlap_th", "0.7",
                       "--max_steps", "1")
    train_segmentation.main(args)
    ckpt = load_checkpoint(tmp_path / "checkpoint_last.pth")
    assert {k: ckpt["builder_kwargs"][k] for k in ("rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "box_fg_iou_thresh",
                                                   "box_bg_iou_thresh", "anchor_sizes", "mask_overlap_thresh")} == {
        "rpn_fg_iou_thresh": 0.6, "rpn_bg_iou_thresh": 0.2, "box_fg_iou_thresh": 0.5, "box_bg_iou_thresh": 0.4,
        "anchor_sizes": [4, 8, 16], "mask_overlap_thresh": 0.7}
    path = str(tmp_path / "checkpoint_last.pth")
    model, _ = load_segmentation_model(SegmentationInferenceConfig(ckpt=path, unfused=True), torch.device("cpu"))
    assert (model.rpn.matcher.high, model.rpn.matcher.low) == (0.6, 0.2)
    assert (model.roi_heads.matcher.high, model.roi_heads.matcher.low) == (0.5, 0.4)
    assert model.rpn.anchor_generator.sizes[0] == (4, 8, 16)
    assert model.roi_heads.mask_overlap_thresh == 0.7
    fast, _ = load_segmentation_model(SegmentationInferenceConfig(ckpt=path, mask_overlap_th=1.0), torch.device("cpu"))
    assert fast.roi_heads.mask_overlap_thresh == 1.0  # an inference flag replaces the stored value


def test_default_lesion_preset_takes_roi_foreground_from_iou_half_and_anchors_up_to_64(trained):
    kwargs = load_checkpoint(trained / "checkpoint_last.pth")["builder_kwargs"]
    assert (kwargs["box_fg_iou_thresh"], kwargs["box_bg_iou_thresh"]) == (0.5, 0.5)
    assert (kwargs["box_batch_size_per_image"], kwargs["fpn_channels"]) == (128, 128)
    assert kwargs["mask_overlap_thresh"] == 0.5 and kwargs["anchor_sizes"] == [4, 8, 16, 32, 64]
    assert not {"rpn_fg_iou_thresh", "rpn_bg_iou_thresh"} & set(kwargs)


def test_paper_preset_keeps_the_originals_matching_and_a_flag_overrides_a_preset(seg_root, tmp_path):
    train_segmentation.main(_train_args(seg_root, tmp_path / "paper", "--preset", "paper", "--max_steps", "1"))
    kwargs = load_checkpoint(tmp_path / "paper" / "checkpoint_last.pth")["builder_kwargs"]
    assert not {"rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "box_fg_iou_thresh", "box_bg_iou_thresh",
                "anchor_sizes", "box_batch_size_per_image", "fpn_channels", "mask_overlap_thresh"} & set(kwargs)
    model = maskrcnn_resnet_fpn(**kwargs)
    assert (model.roi_heads.matcher.high, model.roi_heads.matcher.low) == (0.75, 0.5)
    config = SegmentationTrainConfig(roi_fg_iou_th=0.6)
    assert segmentation_builder_kwargs(config)["box_fg_iou_thresh"] == 0.6
    assert segmentation_builder_kwargs(config)["box_bg_iou_thresh"] == 0.5
    with pytest.raises(ValueError, match="preset must be one of"):
        segmentation_builder_kwargs(SegmentationTrainConfig(preset="fast"))
    paper = str(tmp_path / "paper" / "checkpoint_last.pth")  # a 256-channel FPN into the lesion preset's 128
    with pytest.raises(ValueError, match="paper/checkpoint_last.pth: its weights do not fit"):
        train_segmentation.main(_train_args(seg_root, tmp_path / "lesion", "--pretrained_model", paper))


def test_best_checkpoint_is_the_epoch_with_the_highest_mask_map(seg_root, tmp_path, monkeypatch):
    values = iter([0.1, 0.3, 0.2])
    monkeypatch.setattr(loops, "segm_ap", lambda *a, **k: {"segm_mAP": next(values), "segm_AP50": 0.5})
    args = _train_args(seg_root, tmp_path, "--max_steps", "1")
    args.num_epochs = 3
    train_segmentation.main(args)
    logged = [json.loads(line)["val_segm_mAP"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0.1, 0.3, 0.2]
    best = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert best["epoch"] == 1 and best["val_segm_mAP"] == 0.3
    assert best["best"] == {"metric": "val_segm_mAP", "higher_is_better": True, "value": 0.3, "epoch": 1}


def test_augment_flag_augments_the_training_slices_only(seg_root, tmp_path):
    from datasets.augmentation import SliceAugmentation
    from models.mask_net.workflows.segmentation import SegmentationTrainConfig, segmentation_loaders

    args = _train_args(seg_root, tmp_path / "run", "--augment")
    config = config_from_args(SegmentationTrainConfig, args)
    train_loader, val_loader = segmentation_loaders(config)
    assert isinstance(train_loader.dataset.transforms, SliceAugmentation) and val_loader.dataset.transforms is None
    plain = segmentation_loaders(config_from_args(SegmentationTrainConfig, _train_args(seg_root, tmp_path / "b")))
    assert plain[0].dataset.transforms is None
    train_segmentation.main(args)
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["args"]["augment"] is True


def test_resume_continues_at_the_next_epoch(seg_root, trained, tmp_path):
    last = load_checkpoint(trained / "checkpoint_last.pth")
    args = _train_args(seg_root, tmp_path, "--resume", str(trained / "checkpoint_last.pth"))
    args.num_epochs = 2
    train_segmentation.main(args)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]
    resumed = load_checkpoint(tmp_path / "checkpoint_last.pth")
    assert resumed["epoch"] == 1
    assert resumed["optimizer"]["state"][0]["step"] > last["optimizer"]["state"][0]["step"]


def test_inference_writes_overlays_and_coco_results(seg_root, trained, tmp_path):
    args = inference_segmentation.get_args_parser().parse_args([
        "--ckpt", str(trained / "checkpoint_last.pth"), "--test_data_dir", str(seg_root / "test"),
        "--save_dir", str(tmp_path), "--confidence_th", "0.0"])
    out = inference_segmentation.main(args)
    results = json.loads(out.read_text())
    n_images = len(list((seg_root / "test" / "imgs").glob("*.png")))
    assert len(list(tmp_path.glob("*_overlay.png"))) == n_images
    assert results, "a threshold of 0 keeps the untrained model's detections"
    first = results[0]
    assert {"image_id", "file_name", "category_id", "score", "bbox", "segmentation"} <= set(first)
    assert first["segmentation"]["size"] == [64, 64]


def test_inference_runs_the_fused_copy_unless_unfused(seg_root, trained, tmp_path, monkeypatch):
    runs = {}
    for name, extra in (("fused", []), ("unfused", ["--unfused"])):
        args = inference_segmentation.get_args_parser().parse_args([
            "--ckpt", str(trained / "checkpoint_last.pth"), "--test_data_dir", str(seg_root / "test"),
            "--save_dir", str(tmp_path / name), "--confidence_th", "0.0", "--no_overlays", *extra])
        model, _ = load_segmentation_model(config_from_args(SegmentationInferenceConfig, args), torch.device("cpu"))
        assert any(isinstance(m, WinogradConv2d) for m in model.modules()) == (name == "fused")
        runs[name] = json.loads(inference_segmentation.main(args).read_text())
    fused, unfused = runs["fused"], runs["unfused"]
    assert len(fused) == len(unfused) > 0
    for a, b in zip(fused, unfused):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)


def test_contradicting_architecture_flag_is_refused(seg_root, trained, tmp_path):
    args = inference_segmentation.get_args_parser().parse_args([
        "--ckpt", str(trained / "checkpoint_last.pth"), "--test_data_dir", str(seg_root / "test"),
        "--save_dir", str(tmp_path), "--truncation", "2"])
    with pytest.raises(ValueError, match="--truncation 2 contradicts"):
        inference_segmentation.main(args)


def test_missing_image_folder_is_named(trained, tmp_path):
    args = inference_segmentation.get_args_parser().parse_args([
        "--ckpt", str(trained / "checkpoint_last.pth"), "--test_data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inference_segmentation.main(args)


def test_evaluation_matches_metric_on_same_outputs(seg_root, trained, tmp_path):
    # the original README's command, with data and output folders added
    args = evaluation_mean_ap.get_args_parser().parse_args([
        "--backbone_name", "resnet18", "--ckpt", str(trained / "checkpoint_last.pth"), "--mask_type", "merge",
        "--truncation", "1", "--rpn_nms_th", "0.75", "--roi_nms_th", "0.75", "--confidence_th", "0.0",
        "--test_data_dir", str(seg_root / "test"), "--save_dir", str(tmp_path)])
    results = evaluation_mean_ap.main(args)
    from_python = evaluate_mean_ap(MeanAPConfig(ckpt=str(trained / "checkpoint_last.pth"), rpn_nms_th=0.75,
                                                roi_nms_th=0.75, confidence_th=0.0,
                                                test_data_dir=str(seg_root / "test"), save_dir=str(tmp_path / "py")))
    assert json.dumps(from_python, sort_keys=True) == json.dumps(results, sort_keys=True), "same pipeline, no argparse"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) >= {"segm", "bbox"}
    for iou_type in ("segm", "bbox"):
        assert len(results[iou_type]["AP"]) == 10
        assert results[iou_type]["num_images"] == len(list((seg_root / "test" / "imgs").glob("*.png")))
        assert 0.0 <= results[iou_type]["mAP"] <= 1.0


@pytest.mark.parametrize("script", ["train_segmentation.py", "inference_segmentation.py", "evaluation_mean_ap.py"])
def test_help(script):
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True)
    assert "default" in out.stdout and "--device" in out.stdout
