"""Anchor coverage benchmark: best-anchor IoU on known anchors, and the command on a tiny phantom."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.anchor_coverage import best_anchor_iou, build_model, get_args_parser, main, model_anchors, summarize
from datasets.synthetic import generate_dataset


@pytest.fixture(scope="module")
def square_16_model():
    """ResNet18 without layer4 (one level, stride 16) with a single 16x16 anchor per position."""
    return build_model(backbone_name="resnet18", truncation=1, image_size=64, anchor_sizes=(16,), aspect_ratios=(1.0,))


def test_model_anchors_follow_the_stride(square_16_model):
    anchors = model_anchors(square_16_model, (64, 64))
    assert anchors.shape == (16, 4)  # 4x4 grid at stride 16, one anchor each
    assert torch.equal(anchors[0], torch.tensor([-8.0, -8.0, 8.0, 8.0]))
    assert torch.equal(anchors[5], torch.tensor([8.0, 8.0, 24.0, 24.0]))  # centre (16, 16)


def test_best_iou_of_an_anchor_and_of_its_nested_half(square_16_model):
    anchors = model_anchors(square_16_model, (64, 64))
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [8.0, 8.0, 16.0, 24.0]])
    assert torch.allclose(best_anchor_iou(boxes, anchors), torch.tensor([1.0, 0.5]))
    assert best_anchor_iou(torch.zeros(0, 4), anchors).shape == (0,)


def test_summarize_buckets_by_side():
    sides, best = torch.tensor([4.0, 10.0, 20.0, 40.0]), torch.tensor([0.2, 0.4, 0.6, 0.8])
    report = summarize(sides, best)
    assert report["n_boxes"] == 4 and report["frac_side_under_16"] == 0.5
    assert report["coverage"] == {"n_boxes": 4, "iou>=0.7": 0.25, "iou>=0.5": 0.5, "iou>=0.3": 0.75}
    assert report["coverage_by_side"]["8-16"] == {"n_boxes": 1, "iou>=0.7": 0.0, "iou>=0.5": 0.0, "iou>=0.3": 1.0}
    assert report["median_best_iou"] == pytest.approx(0.5)


def test_main_on_a_tiny_phantom(tmp_path, capsys):
    generate_dataset(tmp_path, seed=1, n_seg_patients=6, slices_per_patient=2, image_size=64, outputs=("seg",),
                     montage=False)
    out = tmp_path / "coverage.json"
    args = get_args_parser().parse_args(["--data_dir", str(tmp_path / "seg" / "train"), "--image_size", "64",
                                         "--out", str(out)])
    report = main(args)
    assert {"setting", "n_boxes", "side_quartiles", "frac_side_under_16", "median_best_iou", "coverage",
            "coverage_by_side"} <= set(report)
    assert set(report["coverage_by_side"]) == {"<8", "8-16", "16-32", ">=32"}
    assert report["n_boxes"] > 0
    rows = [report["coverage"], *report["coverage_by_side"].values()]
    assert sum(row["n_boxes"] for row in rows[1:]) == report["n_boxes"]
    fractions = [v for row in rows for k, v in row.items() if k != "n_boxes"] + [report["frac_side_under_16"]]
    assert all(v is None or 0.0 <= v <= 1.0 for v in fractions)
    assert 0.0 <= report["median_best_iou"] <= 1.0
    assert json.loads(out.read_text())["n_boxes"] == report["n_boxes"]
    assert "iou>=0.7" in capsys.readouterr().out
