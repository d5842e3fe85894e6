"""convert_dicom.py: DICOM series -> NIfTI in HU, one file per series, geometry kept."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

import convert_dicom
from datasets.io import convert_dicom_folder, read_dicom_series, series_file_stems
from tests.helpers import CT_SMALL, write_series

REPO = Path(__file__).resolve().parents[1]


def test_two_series_to_two_files_with_hu_and_geometry(tmp_path):
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    uid_a, stored_a = write_series(dicom, n=4, uid="1.2.840.1", name_prefix="a", description="Lung 1.0/B70f")
    write_series(dicom, n=3, uid="1.2.840.2", name_prefix="b", description="Lung 1.0/B70f", gap=-3.0, seed=2)
    (dicom / "DICOMDIR.txt").write_text("not dicom")
    volumes = read_dicom_series(dicom)
    paths = convert_dicom.main(convert_dicom.get_args_parser().parse_args([str(dicom), str(tmp_path / "out")]))
    assert [p.name for p in paths] == ["Lung_1.0_B70f_1.2.840.1.nii.gz", "Lung_1.0_B70f_1.2.840.2.nii.gz"]
    for path, volume in zip(paths, volumes):
        image = nib.load(path)
        assert image.get_data_dtype() == np.int16
        np.testing.assert_array_equal(np.asarray(image.dataobj), volume.array)
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        step = 2.5 if "840.1" in path.name else 3.0
        np.testing.assert_allclose(image.header.get_zooms(), (0.5, 0.7, step), atol=1e-5)
    first = np.asarray(nib.load(paths[0]).dataobj)
    np.testing.assert_array_equal(first[:, :, 0], stored_a[0].T.astype(np.int16) - 1024)


def test_non_integral_rescale_gives_float32(tmp_path):
    (tmp_path / "in").mkdir()
    write_series(tmp_path / "in", n=3, slope=0.5, intercept=-1000.0)
    (path,) = convert_dicom_folder(tmp_path / "in", tmp_path / "out")
    assert path.name == "chest.nii.gz"
    assert nib.load(path).get_data_dtype() == np.float32
    expected = read_dicom_series(tmp_path / "in")[0].array
    np.testing.assert_array_equal(nib.load(path).get_fdata(dtype=np.float32), expected)


def test_ct_small_converts(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(CT_SMALL, tmp_path / "in" / "CT_small.dcm")
    ds = pydicom.dcmread(CT_SMALL)
    (path,) = convert_dicom_folder(tmp_path / "in", tmp_path / "out")
    assert path.name == f"{ds.SeriesInstanceUID}.nii.gz"  # no SeriesDescription: named after the UID
    image = nib.load(path)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, 0], ds.pixel_array.T.astype(np.int16) - 1024)
    np.testing.assert_allclose(image.header.get_zooms(), (0.661468, 0.661468, 5.0), atol=1e-5)


def test_incomplete_series_refused_and_nothing_written(tmp_path):
    (tmp_path / "in").mkdir()
    write_series(tmp_path / "in", n=3, uid="1.2.3.9", name_prefix="ok")
    write_series(tmp_path / "in", n=6, skip=(2,), name_prefix="gap")
    with pytest.raises(ValueError, match="incomplete series"):
        convert_dicom_folder(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "in").mkdir()
    write_series(tmp_path / "in", n=2)
    convert_dicom_folder(tmp_path / "in", tmp_path / "out")
    with pytest.raises(FileExistsError, match="chest.nii.gz"):
        convert_dicom_folder(tmp_path / "in", tmp_path / "out")
    assert len(convert_dicom_folder(tmp_path / "in", tmp_path / "out", overwrite=True)) == 1


def test_output_folder_in_the_input_folder_is_refused(tmp_path):
    """Writing into the DICOM folder changes the input (and can replace its files): refused, nothing written."""
    (tmp_path / "in").mkdir()
    write_series(tmp_path / "in", n=2)
    before = sorted(p.name for p in (tmp_path / "in").iterdir())
    for out in (tmp_path / "in", tmp_path / "in" / "nifti", tmp_path / "in" / ".." / "in"):
        with pytest.raises(ValueError, match="(is the input|inside the input folder) .*in"):
            convert_dicom_folder(tmp_path / "in", out, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == before


def test_recursive_reads_sub_folders(tmp_path):
    (tmp_path / "in" / "study" / "series").mkdir(parents=True)
    write_series(tmp_path / "in" / "study" / "series", n=2)
    with pytest.raises(ValueError, match="no DICOM image"):
        convert_dicom_folder(tmp_path / "in", tmp_path / "out")
    assert len(convert_dicom_folder(tmp_path / "in", tmp_path / "out", recursive=True)) == 1


def test_file_stems_sanitised_and_unique():
    from datasets.io import Volume

    def volume(uid, description):
        return Volume(np.zeros((1, 1, 1), np.float32), np.eye(4), (1.0, 1.0, 1.0), "x", uid, description)

    stems = series_file_stems([volume("1.2", "Thorax / Lung"), volume("1.3", None), volume("1.4", "../..")])
    assert stems == ["Thorax_Lung", "1.3", "series"]


def test_script_runs_from_the_command_line(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(CT_SMALL, tmp_path / "in")
    result = subprocess.run([sys.executable, "convert_dicom.py", str(tmp_path / "in"), str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 series written" in result.stdout and len(list((tmp_path / "out").glob("*.nii.gz"))) == 1
    again = subprocess.run([sys.executable, "convert_dicom.py", str(tmp_path / "in"), str(tmp_path / "out")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.startswith("error: output files exist") and again.stderr.count("\n") == 1
