"""Tiny phantom volumes for the volumetric tests, and the bad-input cases of volume loading."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datasets.io import NotHUWarning
from models.volumetric import get_task
from models.volumetric.common import IMAGE_KEY, LABEL_KEY, LoadVolumed, load_cases
from models.volumetric.inference import predict_case

TINY_SHAPE = (64, 64, 16)
TINY_SPACING = (1.5, 1.5, 4.0)
# Coarse working grids and small windows so every network runs in about a second on a CPU.
TINY_CONFIG = {
    "lesion_seg": {"spacing": (2.0, 2.0, 4.0), "roi_size": (32, 32, 16)},
    "lung_seg": {"spacing": (2.0, 2.0, 4.0), "roi_size": (64, 64, 32)},
}


def chest_phantom(*, seed: int, shape=TINY_SHAPE, spacing=TINY_SPACING, orientation: str = "RAS") -> dict:
    """HU phantom: body ellipse, two lungs (labels 1, 2), lesions (1 GGO, 2 consolidation).

    Uses ``datasets.synthetic.make_chest_volume`` when available, else a simple ellipsoid phantom.
    """
    try:
        from datasets.synthetic import make_chest_volume
    except ImportError:  # the package may export it from its volumes module only
        try:
            from datasets.synthetic.volumes import make_chest_volume
        except ImportError:
            return _ellipsoid_phantom(seed=seed, shape=shape, spacing=spacing, orientation=orientation)
    return make_chest_volume(seed=seed, shape=shape, spacing=spacing, cls=2, orientation=orientation)


def _ellipsoid_phantom(*, seed, shape, spacing, orientation) -> dict:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    image = np.full(shape, -1000, np.int16)
    image[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
    lung = np.zeros(shape, np.uint8)
    for value, cx in ((1, 0.42), (2, -0.42)):
        lung[((x - cx) / 0.32) ** 2 + (y / 0.5) ** 2 + (z / 0.95) ** 2 < 1] = value
    image[lung > 0] = -850
    lesion = np.zeros(shape, np.uint8)
    cx, cy = rng.uniform(0.3, 0.5), rng.uniform(-0.2, 0.2)
    blob = ((x - cx) / 0.12) ** 2 + ((y - cy) / 0.15) ** 2 + (z / 0.6) ** 2 < 1
    lesion[blob & (lung > 0)] = 1
    image[lesion == 1] = -400
    image = image + rng.normal(0, 10, shape).astype(np.int16)
    signs = [1.0 if c in "RAS" else -1.0 for c in orientation]
    affine = np.diag([s * d for s, d in zip(signs, spacing)] + [1.0])
    affine[:3, 3] = [-s * d * n / 2 for s, d, n in zip(signs, spacing, shape)]
    return {"image": image, "lung": lung, "lesion": lesion, "affine": affine, "cls": 2}


def write_case(folder: Path, name: str, *, seed: int, label: str = "lung", orientation: str = "RAS",
               spacing=TINY_SPACING, shape=TINY_SHAPE) -> dict:
    """Write ``<name>.nii.gz`` and ``<name>_<label>.nii.gz``; returns the case dict (absolute paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = chest_phantom(seed=seed, shape=shape, spacing=spacing, orientation=orientation)
    image_path, label_path = folder / f"{name}.nii.gz", folder / f"{name}_{label}.nii.gz"
    nib.save(nib.Nifti1Image(volume["image"].astype(np.int16), volume["affine"]), image_path)
    nib.save(nib.Nifti1Image(volume[label].astype(np.uint8), volume["affine"]), label_path)
    return {IMAGE_KEY: str(image_path), LABEL_KEY: str(label_path), "case": name}


def write_dicom_series(folder: Path, hu: np.ndarray, *, spacing=(0.8, 0.9, 3.0)) -> Path:
    """Write ``hu`` Int16[X, Y, Z] as a CT series, one file per slice, stored with intercept -1024."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality, ds.PatientID = series, study, "CT", "phantom"
        ds.InstanceNumber = hu.shape[2] - k  # files not in slice order
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"slice_{(k * 7) % hu.shape[2]:03d}_{k}.dcm", enforce_file_format=True)
    return folder


def write_datalist(root: Path, *, label: str = "lung", n_train: int = 2, n_val: int = 1) -> Path:
    """A dataset.json with relative paths and training/validation/testing sections."""
    cases = [write_case(root / "volumes", f"case{i}", seed=i, label=label) for i in range(n_train + n_val)]
    rel = [{k: str(Path(v).relative_to(root)) for k, v in c.items() if k != "case"} for c in cases]
    datalist = {"training": rel[:n_train], "validation": rel[n_train:], "testing": [r[IMAGE_KEY] for r in rel[n_train:]]}
    path = root / "dataset.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def test_datalist_paths_are_absolute_and_exist(tmp_path):
    path = write_datalist(tmp_path, n_train=2, n_val=1)
    cases = load_cases(path, data_root=tmp_path, section="training")
    assert len(cases) == 2 and all(Path(c[IMAGE_KEY]).is_absolute() and Path(c[LABEL_KEY]).is_file() for c in cases)


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
    with pytest.raises(ValueError, match=r"case mismatch: image .* has shape \(64, 64, 16\) but label .* \(32, 32, 16\)"):
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
    out = predict_case(case, model=model.eval(), task=task, config=config, device=torch.device("cpu"))
    assert out["mask"].shape == (20, 18, 4)
