"""summary.json of a demo or benchmark run: read from the evaluation files, checked against the goals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from utils.classification_metrics import classification_report, to_jsonable
from utils.mean_ap import mean_average_precision
from utils.quality import DEMO_FLOORS, FULL_GOALS, collect_summary, html_table, markdown_table, quality_rows


def _write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data)))


def _segmentation_metrics() -> dict:
    """evaluation_mean_ap.py's metrics.json layout: one of two lesions found exactly, one missed."""
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, 2:6, 2:6], masks[1, 10:14, 10:14] = 1, 1
    target = {"boxes": torch.tensor([[2.0, 2, 6, 6], [10, 10, 14, 14]]), "labels": torch.tensor([1, 1]), "masks": masks}
    prediction = {"boxes": target["boxes"][:1], "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                  "masks": masks[:1].float()}
    return {t: mean_average_precision([prediction], [target], iou_type=t) for t in ("segm", "bbox")}


@pytest.fixture
def run(tmp_path):
    """A run folder as demo.py lays it out, with each evaluation script's output."""
    _write(tmp_path / "segmentation/eval/metrics.json", {"checkpoint": "x", "mask_type": "both",
                                                         **_segmentation_metrics()})
    labels = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    scans = classification_report([0, 1, 2], np.eye(3) * 0.9 + 0.1 / 3)
    _write(tmp_path / "classifier/eval/metrics.json", {"level": "scan", "slice": classification_report(labels, probs),
                                                       "scan": scans})
    _write(tmp_path / "lung_seg/test/metrics.json", {"task": "lung_seg", "cases": 10, "empty_ground_truth_cases": 0,
                                                     "mean_dice": 0.93, "ignore_empty": False})
    _write(tmp_path / "lesion_seg/test/metrics.json", {"task": "lesion_seg", "cases": 12, "empty_ground_truth_cases": 4,
                                                       "mean_dice": 0.6, "ignore_empty": True})
    _write(tmp_path / "covid_cls/test/metrics.json", {"accuracy": 0.8, "sensitivity": 0.75, "specificity": 0.83,
                                                      "auc": 0.9, "cases": 4})
    return tmp_path


def test_summary_holds_the_issue_keys_read_from_the_evaluation_files(run):
    summary = collect_summary(run, seed=3, budget="fast", minutes=12.345, step_seconds={"train_seg": 90.0})
    assert (summary["seed"], summary["budget"], summary["minutes"]) == (3, "fast", 12.35)
    seg = summary["mask_net_segmentation"]
    # precision 1 up to recall 1/2 at every IoU: 51 of COCO's 101 recall points
    assert seg["segm_AP50"] == pytest.approx(51 / 101) and seg["segm_mAP"] == pytest.approx(51 / 101)
    assert seg["train_minutes"] == 1.5
    cls = summary["mask_net_classifier"]
    assert cls["slice_accuracy"] == pytest.approx(5 / 6) and cls["scan_accuracy"] == 1.0 and cls["scans"] == 3
    assert summary["lung_seg"] == {"mean_dice": 0.93, "cases": 10, "ignore_empty": False}
    assert summary["covid_cls"]["auc"] == 0.9 and summary["covid_cls"]["cases"] == 4
    assert summary["lesion_seg"]["cases"] == 8  # the mean is over the scans with lesions
    assert "organ_seg" not in summary  # only what was trained and evaluated
    json.dumps(summary)


def test_rows_pass_fail_and_case_counts(run):
    summary = collect_summary(run, seed=0, budget="fast", minutes=1.0)
    rows = {(r["model"], r["metric"]): r for r in quality_rows(summary, DEMO_FLOORS)}
    assert rows[("lung_seg", "mean_dice")]["pass"] and rows[("mask_net_segmentation", "segm_AP50")]["pass"]
    assert not rows[("covid_cls", "auc")]["pass"], "an AUC over 4 scans does not count: the demo asks for 10"
    assert rows[("mask_net_classifier", "slice_accuracy")]["cases"] == 6  # slices, not scans
    summary["covid_cls"]["cases"] = 10
    assert {r["model"]: r["pass"] for r in quality_rows(summary, DEMO_FLOORS)}["covid_cls"]
    summary["budget"] = "full"
    full = {(r["model"], r["metric"]): r["pass"] for r in quality_rows(summary, FULL_GOALS)}
    assert not full[("covid_cls", "auc")] and not full[("lung_seg", "mean_dice")]
    summary["lung_seg"]["mean_dice"] = math.nan
    assert not {r["model"]: r["pass"] for r in quality_rows(summary, DEMO_FLOORS)}["lung_seg"]


def test_tables_show_every_row(run):
    rows = quality_rows(collect_summary(run, seed=0, budget="fast", minutes=1.0), DEMO_FLOORS)
    text, page = markdown_table(rows), html_table(rows)
    assert text.count("\n") == len(rows) + 2 and "| covid_cls | auc | 0.900 | >= 0.80 | 4 |" in text
    assert page.count("<tr") == len(rows) + 1 and "&ge; 0.80" in page


def test_a_malformed_evaluation_file_is_named(run):
    (run / "lung_seg/test/metrics.json").write_text(json.dumps({"dice": 0.9}))
    with pytest.raises(ValueError, match="lung_seg/test/metrics.json"):
        collect_summary(run, seed=0, budget="fast", minutes=1.0)


def test_benchmark_report_names_the_command_and_what_was_missed(run, tmp_path):
    from benchmarks.bench_quality import write_report

    summary = collect_summary(run, seed=11, budget="fast", minutes=3.0)
    rows = quality_rows(summary, DEMO_FLOORS)
    text = write_report(summary, rows, tmp_path / "quality.md", "cpu").read_text()
    assert "--seed 11 --budget fast --device cpu" in text and "Missed: covid_cls auc." in text
