"""The one-axis-at-a-time inversion of the segmentation tasks against MONAI's Invertd."""
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from scipy import ndimage

from datasets.io import Volume, write_nifti
from models.volumetric.common import IMAGE_KEY, apply_transform
from models.volumetric.config import SegConfig
from models.volumetric.resample_back import resample_back, separable_axes
from models.volumetric.segmentation import PRED_KEY, inverted_argmax, seg_preprocessing

SHAPE = (37, 30, 11)


def _affine(codes: str, spacing=(0.7, 0.8, 2.5)) -> np.ndarray:
    """Voxel -> RAS affine whose axes point along ``codes`` (e.g. ``"PLS"``: i towards posterior)."""
    directions = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, code in enumerate(codes):
        axis, sign = directions[code]
        affine[axis, i] = sign * spacing[i]
    affine[:3, 3] = (-12.0, 30.5, -40.25)
    return affine


def _case(tmp_path, affine: np.ndarray, config: SegConfig) -> tuple[dict, Compose, MetaTensor, torch.Tensor]:
    """Pre-processed case, its transform, the loaded image and smooth 3-class probabilities on the working grid."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 300, SHAPE).astype(np.float32)
    path = write_nifti(Volume(hu, affine, tuple(np.linalg.norm(affine[:3, :3], axis=0)), "x"), tmp_path / "x.nii.gz")
    transforms = seg_preprocessing(config, keys=(IMAGE_KEY,))
    loaded = apply_transform(transforms[0], {IMAGE_KEY: str(path), "case": "x"})
    rest = Compose(transforms[1:])
    data = apply_transform(rest, dict(loaded))
    logits = ndimage.gaussian_filter(rng.normal(size=(3, *data[IMAGE_KEY].shape[1:])), sigma=(0, 1.5, 1.5, 1)) * 8
    return data, rest, loaded[IMAGE_KEY], torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=0)


def _invertd(probs: torch.Tensor, data: dict, rest: Compose) -> list[torch.Tensor]:
    out = []
    for c in range(probs.shape[0]):
        data[PRED_KEY] = MetaTensor(probs[c:c + 1])
        out.append(Invertd(PRED_KEY, transform=rest, orig_keys=IMAGE_KEY, nearest_interp=False)(data)[PRED_KEY])
    return out


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PLS", "SRA"])
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 3.0), (0.5, 2.0, 1.7)])
def test_probabilities_mapped_back_one_axis_at_a_time_equal_invertd(tmp_path, codes, spacing):
    config = SegConfig(spacing=spacing, roi_size=(16, 16, 8), hu_window=(-1000.0, 500.0))
    data, rest, original, probs = _case(tmp_path, _affine(codes), config)
    axes = separable_axes(data[IMAGE_KEY], original)
    assert axes is not None
    reference = _invertd(probs, data, rest)
    for c, expected in enumerate(reference):
        mapped = resample_back(probs[c], axes, original.shape[1:])
        assert mapped.shape == original.shape[1:]
        np.testing.assert_allclose(mapped.numpy(), expected[0].numpy(), atol=1e-6)
    labels = inverted_argmax(probs, data, rest, original=original)
    stacked = torch.stack([p[0].as_tensor() for p in reference])
    top2 = stacked.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5  # voxels whose argmax float rounding cannot flip
    assert clear.float().mean() > 0.99
    np.testing.assert_array_equal(labels[0].numpy()[clear.numpy()], stacked.argmax(0).numpy()[clear.numpy()])
    np.testing.assert_allclose(labels.affine.numpy(), original.affine.numpy())
    assert len(np.unique(labels.numpy())) == 3


def test_oblique_grids_and_other_interpolations_are_left_to_invertd(tmp_path):
    tilt = np.radians(10)
    oblique = _affine("RAS") @ np.array([[1, 0, 0, 0], [0, np.cos(tilt), -np.sin(tilt), 0],
                                         [0, np.sin(tilt), np.cos(tilt), 0], [0, 0, 0, 1]])
    config = SegConfig(spacing=(1.5, 1.5, 3.0), roi_size=(16, 16, 8), hu_window=(-1000.0, 500.0))
    data, rest, original, probs = _case(tmp_path, oblique, config)
    assert separable_axes(data[IMAGE_KEY], original) is None
    expected = torch.stack([p[0].as_tensor() for p in _invertd(probs, data, rest)]).argmax(0)
    labels = inverted_argmax(probs, data, rest, original=original)
    np.testing.assert_array_equal(labels[0].numpy(), expected.numpy())

    data, rest, original, probs = _case(tmp_path, _affine("LPS"), config)
    data[IMAGE_KEY].applied_operations[-1]["extra_info"]["mode"] = "nearest"
    assert separable_axes(data[IMAGE_KEY], original) is None
    assert separable_axes(torch.zeros(1, 2, 2, 2), original) is None  # no trace of the pre-processing
