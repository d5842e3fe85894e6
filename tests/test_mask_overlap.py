"""Mask-overlap suppression: stacked detections of one lesion are dropped, separate ones kept."""
from __future__ import annotations

import pytest
import torch

from models.mask_net.mask_overlap import mask_overlap_keep
from tests.test_mask_net import small_model

SIZE = (64, 64)


def full_masks(n: int) -> torch.Tensor:
    """RoI masks that fill their boxes (Float[n, 1, 28, 28])."""
    return torch.ones((n, 1, 28, 28))


def keep(boxes, scores, thresh=0.5, masks=None, max_side=128):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    masks = full_masks(len(boxes)) if masks is None else masks
    return mask_overlap_keep(masks, boxes, torch.tensor(scores), SIZE, thresh=thresh, max_side=max_side).tolist()


def test_a_part_nested_in_a_better_whole_is_dropped_a_separate_lesion_kept():
    whole, part, elsewhere = [8, 8, 40, 40], [10, 10, 22, 22], [48, 48, 60, 60]
    assert keep([whole, part, elsewhere], [0.9, 0.8, 0.7]) == [0, 2]


def test_a_better_part_keeps_the_whole_that_is_mostly_outside_it():
    whole, part = [8, 8, 40, 40], [10, 10, 22, 22]  # the part covers 14 % of the whole
    assert keep([whole, part], [0.6, 0.9]) == [0, 1]


def test_threshold_is_the_fraction_of_the_mask_inside_one_kept_mask():
    a, b = [0, 0, 20, 20], [10, 0, 30, 20]  # b is half inside a
    assert keep([a, b], [0.9, 0.8], thresh=0.6) == [0, 1]
    assert keep([a, b], [0.9, 0.8], thresh=0.4) == [0]
    assert keep([a, b], [0.9, 0.8], thresh=1.0) == [0, 1]


def test_dropped_detections_do_not_drop_others_and_empty_masks_stay():
    a, b, c = [0, 0, 30, 30], [0, 0, 20, 20], [0, 0, 10, 10]
    masks = full_masks(4)
    masks[3] = 0
    # b is dropped by a; c is inside a too (dropped by a, not by the dropped b); the empty mask stays
    assert keep([a, b, c, c], [0.9, 0.8, 0.7, 0.6], masks=masks) == [0, 3]


def test_a_model_with_suppression_returns_a_subset_of_its_detections_without():
    torch.manual_seed(0)
    model = small_model(box_score_thresh=0.0, box_detections_per_img=50).eval()
    torch.nn.init.constant_(model.roi_heads.mask_predictor.mask_fcn_logits.bias, 5.0)  # masks fill their boxes
    images = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        everything = model(images)[0]
        model.roi_heads.mask_overlap_thresh = 0.5
        kept = model(images)[0]
    assert 0 < kept["scores"].numel() < everything["scores"].numel()
    rows = {tuple(b) for b in everything["boxes"].tolist()}
    assert {tuple(b) for b in kept["boxes"].tolist()} <= rows
    assert kept["masks"].shape[1:] == everything["masks"].shape[1:]


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_builder_refuses_a_threshold_outside_zero_one(value):
    with pytest.raises(ValueError, match="mask_overlap_thresh must be in"):
        small_model(mask_overlap_thresh=value)
