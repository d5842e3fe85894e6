"""utils.dice against MONAI's DiceMetric, including the empty-ground-truth convention."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from utils.dice import dice_per_class, mean_ignoring_nan


def monai_dice(pred: np.ndarray, target: np.ndarray, *, num_classes: int, ignore_empty: bool) -> list[float]:
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=ignore_empty)
    p = one_hot(torch.as_tensor(pred)[None, None], num_classes)
    t = one_hot(torch.as_tensor(target)[None, None], num_classes)
    return metric(p, t)[0].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_matches_monai_on_random_label_maps(seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.integers(0, 3, (12, 10, 6)), rng.integers(0, 3, (12, 10, 6))
    ours = dice_per_class(pred, target, num_classes=3)
    assert ours == pytest.approx(monai_dice(pred, target, num_classes=3, ignore_empty=False), abs=1e-6)


def test_hand_computed_value():
    pred = np.zeros((4, 4, 2), int)
    target = np.zeros((4, 4, 2), int)
    pred[:2, :2, 0] = 1  # 4 voxels
    target[:2, :, 0] = 1  # 8 voxels, 4 shared
    assert dice_per_class(pred, target, num_classes=2) == [pytest.approx(2 * 4 / 12)]


@pytest.mark.parametrize("pred_empty", [True, False])
def test_empty_ground_truth_convention_matches_monai(pred_empty):
    target = np.zeros((8, 8, 4), int)
    pred = np.zeros_like(target)
    if not pred_empty:
        pred[2:4, 2:4, 1] = 1
    ours = dice_per_class(pred, target, num_classes=2)[0]
    assert ours == (1.0 if pred_empty else 0.0)
    assert ours == pytest.approx(monai_dice(pred, target, num_classes=2, ignore_empty=False)[0])
    excluded = dice_per_class(pred, target, num_classes=2, ignore_empty=True)[0]
    assert math.isnan(excluded) and math.isnan(monai_dice(pred, target, num_classes=2, ignore_empty=True)[0])


def test_mean_skips_excluded_cases_and_shapes_must_match():
    assert mean_ignoring_nan([0.5, float("nan"), 1.0]) == 0.75
    assert math.isnan(mean_ignoring_nan([float("nan")]))
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), num_classes=2)


def test_lesion_seg_selects_by_the_dice_of_scans_with_lesions(monkeypatch):
    """Validation during training: a lesion-free scan is left out of lesion_seg's mean, not scored 1."""
    from types import SimpleNamespace

    from models.volumetric import lesion_seg, training

    lesion = torch.zeros(1, 4, 4, 4)
    lesion[0, 1:3, 1:3, 1:3] = 1
    cases = [{"image": torch.zeros(1, 4, 4, 4), "label": lesion}, {"image": torch.zeros(1, 4, 4, 4),
                                                                   "label": torch.zeros(1, 4, 4, 4)}]
    monkeypatch.setattr(training, "segment", lambda model, image, **kw: torch.zeros(1, 4, 4, 4))  # finds nothing
    task = SimpleNamespace(postprocessing=lambda config: (lambda x: x))
    common = dict(task=task, config=None, device=torch.device("cpu"))
    plain = training.evaluate_dice(torch.nn.Identity(), cases, **common)
    assert plain["dice"] == 0.5  # the empty scan scores 1 for finding nothing
    selected = lesion_seg.TASK.evaluate(torch.nn.Identity(), cases, **common)
    assert selected["dice"] == 0.0 and math.isnan(selected["per_case"][1])
