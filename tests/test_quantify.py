"""Lung/lesion quantities against hand counts and the phantom's own labels."""
import numpy as np
import pytest

from datasets.synthetic import make_chest_volume
from utils.quantify import (
    LESION_CONSOLIDATION,
    LESION_GGO,
    LUNG_LEFT,
    LUNG_RIGHT,
    lesion_types,
    quantify,
    severity_score,
    split_lungs,
    voxel_volume_ml,
)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_split_lungs_matches_phantom_left_right(orientation):
    vol = make_chest_volume(seed=3, cls=2, shape=(64, 64, 16), orientation=orientation)
    assert np.array_equal(split_lungs(vol["lung"] > 0, vol["affine"]), vol["lung"])


def test_split_lungs_single_blob_is_cut_at_midline():
    lungs = np.zeros((10, 4, 2), bool)
    lungs[1:9] = True  # one component spanning x = 1..8
    split = split_lungs(lungs, np.eye(4))  # RAS: +x is the patient's right
    assert (split[1:5] == LUNG_LEFT).all() and (split[5:9] == LUNG_RIGHT).all()
    assert not split[0].any() and not split[9].any()


def test_split_lungs_keeps_whole_components_and_handles_empty():
    lungs = np.zeros((12, 3, 3), bool)
    lungs[0:3], lungs[4:12] = True, True  # a small left lung and a large right one crossing the midline
    split = split_lungs(lungs, np.eye(4))
    assert (split[0:3] == LUNG_LEFT).all() and (split[4:12] == LUNG_RIGHT).all()
    assert not split_lungs(np.zeros((4, 4, 4), bool), np.eye(4)).any()


def test_lesion_types_by_hu_band():
    hu = np.array([-900.0, -500.0, -301.0, -300.0, 20.0]).reshape(5, 1, 1)
    lesion = np.array([1, 1, 1, 1, 0]).reshape(5, 1, 1)
    assert lesion_types(lesion, hu).ravel().tolist() == [LESION_GGO, LESION_GGO, LESION_GGO, LESION_CONSOLIDATION, 0]
    with pytest.raises(ValueError, match="differs"):
        lesion_types(lesion, hu[:4])


@pytest.mark.parametrize("percent,score", [(0, 0), (0.1, 1), (4.99, 1), (5, 2), (24.9, 2), (25, 3), (50, 4),
                                           (74.9, 4), (75, 5), (100, 5)])
def test_severity_score_bins(percent, score):
    assert severity_score(percent) == score


def test_severity_score_refuses_non_percentages():
    with pytest.raises(ValueError, match="percentage"):
        severity_score(120.0)


def test_quantify_hand_counts():
    affine = np.diag([2.0, 2.0, 5.0, 1.0])  # 20 mm^3 = 0.02 mL per voxel
    assert voxel_volume_ml(affine) == pytest.approx(0.02)
    lungs = np.zeros((4, 10, 10), np.uint8)
    lungs[0:2], lungs[2:4] = LUNG_LEFT, LUNG_RIGHT  # 200 voxels each
    lesions = np.zeros_like(lungs)
    lesions[0, :6] = LESION_GGO  # 60 voxels in the left lung
    lesions[1, :2] = LESION_CONSOLIDATION  # 20 voxels in the left lung
    lesions[3, 0, :2] = LESION_GGO  # 2 voxels in the right lung
    q = quantify(lungs, lesions, affine)
    assert q["left"]["lung_ml"] == pytest.approx(4.0) and q["right"]["lung_ml"] == pytest.approx(4.0)
    assert q["left"]["ggo_ml"] == pytest.approx(1.2) and q["left"]["consolidation_ml"] == pytest.approx(0.4)
    assert q["left"]["involvement_percent"] == pytest.approx(40.0) and q["left"]["severity_score"] == 3
    assert q["right"]["involvement_percent"] == pytest.approx(1.0) and q["right"]["severity_score"] == 1
    assert q["total"]["involvement_percent"] == pytest.approx(20.5)
    assert q["severity_total"] == 4


def test_quantify_ignores_lesions_outside_lungs_and_empty_lungs():
    lungs = np.zeros((3, 3, 3), np.uint8)
    lesions = np.ones_like(lungs)
    q = quantify(lungs, lesions, np.eye(4))
    assert q["total"]["lesion_ml"] == 0.0 and q["total"]["involvement_percent"] == 0.0
    assert q["severity_total"] == 0
