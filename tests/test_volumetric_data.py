"""Tiny phantom volumes for the volumetric tests, and the bad-input cases of volume loading."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datasets.io import NotHUWarning
from models.volumetric import get_task
from models.volumetric.common import IMAGE_KEY, LABEL_KEY, LoadVolumed, load_cases
from models.volumetric.segmentation import segment_case
from tests.helpers import TINY_CONFIG, TINY_SHAPE, write_case, write_datalist

# Coarse working grids and small windows so every network runs in about a second on a CPU.












def test_datalist_paths_are_absolute_and_exist(tmp_path):
    path = write_datalist(tmp_path, n_train=2, n_val=1)
    cases = load_cases(path, data_root=tmp_path, section="training")
    assert len(cases) == 2 and all(Path(c[IMAGE_KEY]).is_absolute() and Path(c[LABEL_KEY]).is_file() for c in cases)


def test_test_and_testing_name_one_section(tmp_path):
    """MSD writes 'test', Clara 'testing' (as write_datalist does); either name reads the section it has."""
    import json

    path = write_datalist(tmp_path, n_train=1, n_val=1)
    testing = load_cases(path, data_root=tmp_path, section="testing")
    test = load_cases(path, data_root=tmp_path, section="test")
    assert [c[IMAGE_KEY] for c in test] == [c[IMAGE_KEY] for c in testing]
    listing = json.loads(path.read_text())
    listing["test"] = listing.pop("testing")
    path.write_text(json.dumps(listing))
    assert len(load_cases(path, data_root=tmp_path, section="testing")) == len(testing) == 1
    with pytest.raises(ValueError, match="no section 'nothing'"):
        load_cases(path, data_root=tmp_path, section="nothing")


def test_non_hu_volume_is_warned_about_naming_the_case(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, TINY_SHAPE).astype(np.uint8)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "png_like.nii.gz")
    with pytest.warns(NotHUWarning, match="png_like.*(HU|Hounsfield)"):
        LoadVolumed((IMAGE_KEY,))({IMAGE_KEY: str(tmp_path / "png_like.nii.gz"), "case": "png_like"})
    with pytest.raises(ValueError, match="png_like.*(HU|Hounsfield)"):
        LoadVolumed((IMAGE_KEY,), strict_hu=True)({IMAGE_KEY: str(tmp_path / "png_like.nii.gz")})


def test_2d_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.full((64, 64), -500, np.int16), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(ValueError, match="slice.*2D image"):
        LoadVolumed((IMAGE_KEY,))({IMAGE_KEY: str(tmp_path / "slice.nii.gz"), "case": "slice"})


def test_image_and_label_of_different_shapes_are_refused(tmp_path):
    case = write_case(tmp_path, "mismatch", seed=0)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.uint8), np.eye(4)), case[LABEL_KEY])
    with pytest.raises(ValueError,
                       match=r"case mismatch: image .* has shape \(64, 64, 16\) but label .* \(32, 32, 16\)"):
        LoadVolumed((IMAGE_KEY, LABEL_KEY))(case)


def test_unreadable_file_is_refused(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match="case broken: cannot read .*broken.nii.gz"):
        LoadVolumed((IMAGE_KEY,))({IMAGE_KEY: str(bad), "case": "broken"})


def test_volume_smaller_than_roi_is_padded_and_works(tmp_path):
    case = write_case(tmp_path, "small", seed=1, shape=(20, 18, 4))
    task = get_task("lesion_seg")
    config = task.make_config(**TINY_CONFIG["lesion_seg"])
    model, _ = task.build_network()
    out = segment_case(case, model=model.eval(), task=task, config=config, device=torch.device("cpu"))
    assert out["mask"].shape == (20, 18, 4)
