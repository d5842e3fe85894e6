"""Input safety of the volumetric scripts: outputs never replace inputs, NaN voxels, clear errors.

Each test stands for a failure that used to pass silently or end in a confusing traceback.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import infer_volumetric
from datasets.io import NonFiniteWarning
from models.volumetric.common import IMAGE_KEY, LABEL_KEY, LoadVolumed
from tests.helpers import chest_phantom, write_case
from tests.helpers import volumetric_checkpoint as _volumetric_checkpoint
from utils.paths import refuse_overwriting_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lung_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised, tiny lung_seg checkpoint."""
    torch.manual_seed(0)
    return _volumetric_checkpoint("lung_seg", tmp_path_factory.mktemp("ckpt") / "lung_seg.pth")


def _infer(ckpt: Path, source: Path, out: Path, *extra: str) -> list[dict]:
    return infer_volumetric.main(infer_volumetric.get_args_parser().parse_args(
        ["--task", "lung_seg", "--ckpt", str(ckpt), "--input", str(source), "--output", str(out), "--no_montage",
         *extra]))


def _nan_scan(path: Path, *, seed: int = 0) -> np.ndarray:
    """The phantom with every 160th voxel (0.6 %) NaN; returns the array written."""
    volume = chest_phantom(seed=seed)
    image = volume["image"].astype(np.float32)
    image.flat[::160] = np.nan
    nib.save(nib.Nifti1Image(image, volume["affine"]), path)
    return image


# ------------------------------------------------------------------------------------ the guard
def test_an_output_may_not_be_an_input(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"scan")
    (tmp_path / "sub").mkdir()
    refuse_overwriting_inputs([scan, None], [tmp_path / "out" / "scan.nii.gz", tmp_path / "lungs.nii.gz"])
    for output in (scan, tmp_path / "sub" / ".." / "scan.nii.gz"):
        with pytest.raises(ValueError, match="is the input"):
            refuse_overwriting_inputs([scan], [output])
    (tmp_path / "alias.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")  # the same file under another name
    for name in ("alias.nii.gz", "hard.nii.gz"):
        with pytest.raises(ValueError, match=f"{name} is the input .*scan.nii.gz"):
            refuse_overwriting_inputs([scan], [tmp_path / name])


def test_an_output_may_not_be_written_into_an_input_folder(tmp_path):
    (tmp_path / "dicom").mkdir()
    with pytest.raises(ValueError, match="inside the input folder .*dicom"):
        refuse_overwriting_inputs([tmp_path / "dicom"], [tmp_path / "dicom" / "out" / "lungs.nii.gz"])
    refuse_overwriting_inputs([tmp_path / "dicom"], [tmp_path / "dicom_out" / "lungs.nii.gz"])  # a sibling


def test_infer_output_may_not_replace_an_input(tmp_path, lung_ckpt):
    """A datalist label named like the mask infer_volumetric writes was overwritten by the prediction."""
    label = Path(write_case(tmp_path, "c0", seed=0)[LABEL_KEY]).rename(tmp_path / "c0_lung_seg.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"validation": [{"image": "c0.nii.gz", "label": "c0_lung_seg.nii.gz"}]}))
    before = label.read_bytes()
    with pytest.raises(ValueError, match="c0_lung_seg.nii.gz is the input"):
        _infer(lung_ckpt, tmp_path / "dataset.json", tmp_path, "--section", "validation")
    assert label.read_bytes() == before
    assert not (tmp_path / "predictions.csv").exists()


# ------------------------------------------------------------------------------------ NaN voxels
def test_infer_refuses_nan_voxels_unless_filled(tmp_path, lung_ckpt):
    """0.6 % NaN voxels gave an empty mask and 0 mL with exit 0; an all-NaN volume "succeeded" too."""
    image = _nan_scan(tmp_path / "scan.nii.gz")
    bad = int(np.isnan(image).sum())
    with pytest.raises(ValueError, match=rf"case scan: image .*scan.nii.gz: {bad} of {image.size} voxels are NaN"):
        _infer(lung_ckpt, tmp_path / "scan.nii.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(NonFiniteWarning, match=f"{bad} of {image.size} voxels .* replaced by -1000 HU"):
        (row,) = _infer(lung_ckpt, tmp_path / "scan.nii.gz", tmp_path / "out", "--fill_nan", "-1000")
    assert nib.load(row["mask"]).shape == image.shape
    nib.save(nib.Nifti1Image(np.full((32, 32, 8), np.nan, np.float32), np.eye(4)), tmp_path / "all_nan.nii.gz")
    with pytest.raises(ValueError, match="all_nan.nii.gz: 8192 of 8192 voxels .*no value"):
        _infer(lung_ckpt, tmp_path / "all_nan.nii.gz", tmp_path / "out2", "--fill_nan", "-1000")


def test_training_loader_names_the_case_with_nan_voxels(tmp_path):
    case = write_case(tmp_path, "c3", seed=3)
    image = nib.load(case[IMAGE_KEY])
    array = image.get_fdata(dtype=np.float32)
    array[5, 6, 7] = np.inf
    nib.save(nib.Nifti1Image(array, image.affine), case[IMAGE_KEY])
    with pytest.raises(ValueError, match=r"case c3: image .*c3.nii.gz: 1 of 65536 voxels are NaN or infinite"):
        LoadVolumed((IMAGE_KEY, LABEL_KEY))(case)


# ---------------------------------------------------------------------------------- clear errors
def test_infer_names_broken_inputs(tmp_path, lung_ckpt):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "no_dicom").mkdir()
    image = chest_phantom(seed=1)["image"].astype(np.int16)
    nib.save(nib.Nifti1Image(np.stack([image, image], axis=-1), np.eye(4)), tmp_path / "four.nii.gz")
    expected = {"empty.nii.gz": r"empty.nii.gz is an empty file \(0 bytes\)",
                "no_dicom": "no DICOM files or volume found in .*no_dicom",
                "four.nii.gz": r"four.nii.gz is 4D with shape \(64, 64, 16, 2\); .*3D volume"}
    for name, pattern in expected.items():
        with pytest.raises(ValueError, match=pattern):
            _infer(lung_ckpt, tmp_path / name, tmp_path / "out")


def test_classification_datalist_for_a_segmentation_task_is_named(tmp_path, lung_ckpt):
    """{"image", "label_image", "label": 0/1} given to lung_seg ended in "cannot read ..., 0 as a volume"."""
    cases = [write_case(tmp_path / "volumes", f"c{i}", seed=i) for i in range(2)]
    entries = [{"image": c[IMAGE_KEY], "label_image": c[LABEL_KEY], "label": i} for i, c in enumerate(cases)]
    (tmp_path / "dataset.json").write_text(json.dumps({"validation": entries}))
    with pytest.raises(ValueError, match=r"case c0: 'label' is 0, a class number.*classification datalist.*"
                                         "needs a segmentation datalist"):
        _infer(lung_ckpt, tmp_path / "dataset.json", tmp_path / "out", "--section", "validation")
    with pytest.raises(ValueError, match="case c1: 'label' is 1, a class number"):  # the training loader
        LoadVolumed((IMAGE_KEY, LABEL_KEY))({**entries[1], "case": "c1"})


def test_nvimagecodec_notice_is_dropped_and_nothing_else(caplog):
    """MONAI logged "nvImageCodec is not available ..." once per loader built, so several times a run."""
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        LoadVolumed((IMAGE_KEY,))
    assert "nvImageCodec is not available" not in caplog.text
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning("another message")
    assert "another message" in caplog.text


# ------------------------------------------------------------------------ the command line
def _script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess, name: str) -> str:
    """The single ``error:`` line of a run that failed with exit code 1 and no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], result.stderr
    return errors[0]


def test_analyze_scan_user_error_is_one_line(tmp_path):
    _nan_scan(tmp_path / "scan_nan.nii.gz")
    for name in ("lung", "lesion"):  # never loaded: the scan is refused first
        (tmp_path / f"{name}.pth").write_bytes(b"")
    result = _script("analyze_scan.py", str(tmp_path / "scan_nan.nii.gz"), "--out", str(tmp_path / "out"),
                     "--lung_ckpt", str(tmp_path / "lung.pth"), "--lesion_ckpt", str(tmp_path / "lesion.pth"),
                     "--skip", "covid_cls", "mask_net_classifier")
    assert "voxels are NaN or infinite" in _one_error_line(result, "scan_nan.nii.gz")


def test_infer_volumetric_user_error_is_one_line(tmp_path, lung_ckpt):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    result = _script("infer_volumetric.py", "--task", "lung_seg", "--ckpt", str(lung_ckpt), "--input",
                     str(tmp_path / "empty.nii.gz"), "--output", str(tmp_path / "out"))
    assert "empty file" in _one_error_line(result, "empty.nii.gz")
    assert "nvImageCodec" not in result.stderr
