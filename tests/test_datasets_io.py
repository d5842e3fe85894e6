"""CT readers: PNG/JPG slices, the HU check, NIfTI, and DICOM (pydicom's real CT_small.dcm and
synthetic multi-slice series written here with pydicom)."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from datasets.io import (
    LPS_TO_RAS,
    NonFiniteWarning,
    NotHUError,
    NotHUWarning,
    Volume,
    check_finite,
    check_hu,
    read_dicom_series,
    read_image,
    read_mask,
    read_nifti,
    read_volume,
    write_nifti,
)
from tests.helpers import CT_SMALL, write_series


# ------------------------------------------------------------------------------------- images
def test_read_image_gray_rgb_rgba_and_jpg(tmp_path):
    gray = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), gray)
    rgb = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    for name in ("c.png", "a.png"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (16, 20)
        np.testing.assert_array_equal(out, expected)
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "j.jpg")
    assert np.abs(read_image(tmp_path / "j.jpg").astype(int) - 77).max() <= 1


def test_read_image_corrupt_or_truncated_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="bad.png.*corrupt"):
        read_image(tmp_path / "bad.png")
    Image.fromarray(np.zeros((64, 64), np.uint8) + 5).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_read_image_16bit_out_of_range_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 3000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="deep.png.*8-bit"):
        read_image(tmp_path / "deep.png")


def test_read_mask_keeps_palette_indices(tmp_path):
    values = np.array([[0, 1], [2, 3]], np.uint8)
    image = Image.fromarray(values, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), values)


# ----------------------------------------------------------------------------------- HU check
@pytest.mark.parametrize("low,high,reason", [(0, 1, "normalised"), (0, 255, "8-bit"), (0, 4095, "Rescale"),
                                             (-400, 3000, "below -500")])
def test_check_hu_flags_non_hu_ranges(low, high, reason):
    array = np.linspace(low, high, 100, dtype=np.float32)
    with pytest.warns(NotHUWarning, match=f"case7.*{reason}"):
        check_hu(array, "case7")
    with pytest.raises(ValueError, match=f"case7.*{reason}"):
        check_hu(array, "case7", strict=True)
    assert issubclass(NotHUWarning, UserWarning)


def test_check_hu_accepts_ct_ranges():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_hu(np.array([-1000.0, -850.0, 40.0, 900.0]), "ct")
        check_hu(np.array([-1024.0, 3071.0]), "ct", strict=True)


# -------------------------------------------------------------------------------------- NIfTI
def lps_affine():
    affine = np.diag([-0.7, -0.8, 2.5, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return affine


def test_nifti_roundtrip_int16_keeps_affine(tmp_path):
    array = np.random.default_rng(0).integers(-1000, 1500, (8, 9, 5)).astype(np.float32)
    path = write_nifti(Volume(array, lps_affine(), (0.7, 0.8, 2.5), "mem"), tmp_path / "v.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == np.int16
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    volume = read_nifti(path)
    assert volume.array.dtype == np.float32 and volume.affine.dtype == np.float64
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, lps_affine(), atol=1e-5)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    assert volume.source == str(path) and volume.series_uid is None


def test_write_nifti_float_when_not_integral(tmp_path):
    array = np.full((4, 4, 3), -1000.5, np.float32)
    path = write_nifti(Volume(array, np.eye(4), (1.0, 1.0, 1.0), "mem"), tmp_path / "f.nii")
    assert nib.load(path).get_data_dtype() == np.float32
    np.testing.assert_array_equal(read_nifti(path).array, array)


def test_write_nifti_keeps_label_maps_uint8(tmp_path):
    labels = np.zeros((4, 4, 3), np.uint8)
    labels[1:3, 1:3, 1] = 2
    path = write_nifti(Volume(labels, np.eye(4), (1.0, 1.0, 1.0), "mem"), tmp_path / "mask.nii.gz")
    assert nib.load(path).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), labels)


def test_read_nifti_shapes(tmp_path):
    hu = np.full((4, 5, 3, 1), -1000, np.int16)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "four.nii.gz")
    assert read_nifti(tmp_path / "four.nii.gz").array.shape == (4, 5, 3)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3, 2), np.int16) - 1000, np.eye(4)), tmp_path / "time.nii.gz")
    with pytest.raises(ValueError, match="time.nii.gz.*3D"):
        read_nifti(tmp_path / "time.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.int16) - 1000, np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match="flat.nii.gz.*3D"):
        read_nifti(tmp_path / "flat.nii.gz")


def test_read_nifti_corrupt_and_not_hu(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        read_nifti(tmp_path / "bad.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8) + 200, np.eye(4)), tmp_path / "png_like.nii.gz")
    with pytest.warns(NotHUWarning, match="png_like.nii.gz"):
        read_nifti(tmp_path / "png_like.nii.gz")
    with pytest.raises(NotHUError, match="png_like.nii.gz.*Hounsfield"):
        read_volume(tmp_path / "png_like.nii.gz", strict_hu=True)


def test_read_nifti_empty_file_is_named(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.nii.gz: empty file \(0 bytes\)"):
        read_volume(tmp_path / "empty.nii.gz")


def _scan_with_nan(path, *, every: int):
    """A HU volume with every ``every``-th voxel NaN and one voxel +inf; returns the array."""
    array = np.full((16, 12, 8), -800.0, np.float32)
    array[4:12, 3:9, :] = 40.0
    array.flat[::every] = np.nan
    array[0, 0, 1] = np.inf
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return array


def test_nan_voxels_are_refused_naming_file_and_count(tmp_path):
    array = _scan_with_nan(tmp_path / "scan.nii.gz", every=160)
    bad = int((~np.isfinite(array)).sum())
    with pytest.raises(ValueError, match=rf"scan.nii.gz: {bad} of {array.size} voxels are NaN or infinite.*--fill_nan"):
        read_volume(tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), tmp_path / "all_nan.nii.gz")
    with pytest.raises(ValueError, match="all_nan.nii.gz: 256 of 256 voxels .*no value"):
        read_nifti(tmp_path / "all_nan.nii.gz", fill_nan=-1000.0)  # nothing left to analyse


def test_fill_nan_replaces_them_with_a_warning(tmp_path):
    array = _scan_with_nan(tmp_path / "scan.nii.gz", every=160)
    with pytest.warns(NonFiniteWarning, match="scan.nii.gz: .* replaced by -1000 HU"):
        volume = read_volume(tmp_path / "scan.nii.gz", fill_nan=-1000.0)
    finite = np.isfinite(array)
    np.testing.assert_array_equal(volume.array[finite], array[finite])
    assert np.all(volume.array[~finite] == -1000.0) and volume.array.dtype == np.float32
    values = np.zeros(4, np.float32)
    assert check_finite(values, "x") is values  # nothing to fill: no copy


def test_dicom_nan_voxels_are_refused(tmp_path, monkeypatch):
    """Float pixel data could hold NaN; the DICOM reader checks the stacked volume as NIfTI does."""
    import datasets.io as io

    write_series(tmp_path, n=3)
    real = io._slice_hu
    monkeypatch.setattr(io, "_slice_hu", lambda s, label: np.where(real(s, label) > 0, np.nan, real(s, label)))
    with pytest.raises(ValueError, match=r"series .*: \d+ of 360 voxels are NaN"):
        read_volume(tmp_path)


# -------------------------------------------------------------------------- DICOM: real slice
def test_ct_small_reads_to_hu_with_spacing_and_affine():
    ds = pydicom.dcmread(CT_SMALL)
    volume = read_volume(CT_SMALL)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024.0  # the rescale matters for this file
    assert volume.array.shape == (ds.Columns, ds.Rows, 1) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[:, :, 0], expected.T)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    np.testing.assert_allclose(volume.spacing, (col_spacing, row_spacing, float(ds.SliceThickness)))
    assert volume.series_uid == ds.SeriesInstanceUID
    # The DICOM standard's pixel position (C.7.6.2.1.1), LPS, compared with our RAS affine.
    ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
    for r, c in [(0, 0), (0, 127), (127, 0), (31, 90)]:
        lps = ipp + c * col_spacing * iop[:3] + r * row_spacing * iop[3:]
        np.testing.assert_allclose(volume.affine @ [c, r, 0, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-6)


def test_ct_small_affine_matches_nibabel_dicom_wrapper():
    ds = pydicom.dcmread(CT_SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental
        from nibabel.nicom import dicomwrappers

        wrapper = dicomwrappers.wrapper_from_data(ds)
    volume = read_volume(CT_SMALL)
    for r, c in [(0, 0), (5, 100), (127, 127)]:  # nibabel's wrapper indexes (row, column), LPS
        np.testing.assert_allclose(volume.affine @ [c, r, 0, 1], LPS_TO_RAS @ wrapper.affine @ [r, c, 0, 1], atol=1e-6)


# --------------------------------------------------------------------- DICOM: written series
def test_series_ordered_by_position_with_hu_and_affine(tmp_path):
    uid, stored = write_series(tmp_path, n=6, gap=-2.5)  # positions descend as k grows
    (volume,) = read_dicom_series(tmp_path)
    assert volume.series_uid == uid and volume.description == "chest"
    assert volume.array.shape == (10, 12, 6)  # [columns, rows, slices]
    # sorted along the normal (+z): k = 5 is lowest so it comes first
    for z, k in enumerate(range(5, -1, -1)):
        np.testing.assert_array_equal(volume.array[:, :, z], stored[k].T.astype(np.float32) - 1024)
    np.testing.assert_allclose(volume.spacing, (0.5, 0.7, 2.5))
    first_ipp = np.array([-20.0, -30.0, 40.0 - 5 * 2.5])
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], [20.0, 30.0, first_ipp[2], 1])
    # corner voxel (last column, last row, last slice) against the DICOM formula in LPS -> RAS
    lps = np.array([-20.0, -30.0, 40.0]) + 9 * 0.5 * np.array([1, 0, 0]) + 11 * 0.7 * np.array([0, 1, 0])
    np.testing.assert_allclose(volume.affine @ [9, 11, 5, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-6)
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")


def test_oblique_series_geometry_and_rescale(tmp_path):
    angle = np.deg2rad(20)
    iop = (1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(-np.sin(angle)))
    uid, stored = write_series(tmp_path, n=4, iop=iop, gap=3.0, slope=0.5, intercept=-1000.0)
    (volume,) = read_dicom_series(tmp_path)
    np.testing.assert_allclose(volume.array[:, :, 2], stored[2].T * 0.5 - 1000.0)
    normal = np.cross(iop[:3], iop[3:])
    for i, j, k in [(0, 0, 0), (9, 11, 3), (4, 7, 1)]:
        lps = np.array([-20.0, -30.0, 40.0]) + i * 0.5 * np.array(iop[:3]) + j * 0.7 * np.array(iop[3:]) \
            + k * 3.0 * normal
        np.testing.assert_allclose(volume.affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-5)


def test_two_series_in_one_folder_and_non_dicom_files_skipped(tmp_path):
    uid_a, _ = write_series(tmp_path, n=3, uid="1.2.3.1", name_prefix="a", description="lung")
    uid_b, _ = write_series(tmp_path, n=5, uid="1.2.3.2", name_prefix="b", rows=8, cols=8, seed=1)
    (tmp_path / "README.txt").write_text("not dicom")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "preview.png")
    volumes = read_dicom_series(tmp_path)
    assert [v.series_uid for v in volumes] == [uid_a, uid_b]
    assert [v.array.shape for v in volumes] == [(10, 12, 3), (8, 8, 5)]
    with pytest.raises(ValueError, match=r"2 DICOM series.*1\.2\.3\.1.*1\.2\.3\.2"):
        read_volume(tmp_path)


def test_no_dicom_in_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"no DICOM image found in {tmp_path}: none of its 1 files"):
        read_dicom_series(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM image found in .*empty: the folder is empty"):
        read_volume(tmp_path / "empty")


def test_missing_slice_is_an_incomplete_series(tmp_path):
    write_series(tmp_path, n=6, skip=(3,))
    with pytest.raises(ValueError, match="incomplete series.*missing between"):
        read_dicom_series(tmp_path)


def test_duplicate_positions_refused(tmp_path):
    uid, _ = write_series(tmp_path, n=3, name_prefix="x")
    write_series(tmp_path, n=3, uid=uid, name_prefix="y", seed=3)
    with pytest.raises(ValueError, match="same position"):
        read_dicom_series(tmp_path)


@pytest.mark.parametrize("other,what", [(dict(rows=10), "Rows x Columns"),
                                        (dict(pixel_spacing=(0.9, 0.9)), "PixelSpacing"),
                                        (dict(iop=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0)), "ImageOrientationPatient")])
def test_mixed_series_refused(tmp_path, other, what):
    uid, _ = write_series(tmp_path, n=3, name_prefix="x")
    write_series(tmp_path, n=1, uid=uid, name_prefix="odd", origin=(-20.0, -30.0, 50.0), **other)
    with pytest.raises(ValueError, match=f"mixed series, {what} of odd000.dcm"):
        read_dicom_series(tmp_path)
