"""PNG slice folders stacked into volumes: order, geometry, HU and bad input."""
import numpy as np
import pytest
from PIL import Image

from datasets.conventions import LUNG_WINDOW, hu_to_png
from datasets.png_stack import list_slices, read_png_stack
from datasets.synthetic import make_chest_volume
from utils.quantify import split_lungs


def _write(folder, names, size=(8, 6), value=100):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full(size, value + i, np.uint8)).save(folder / name)


def test_order_follows_slice_numbers(tmp_path):
    names = ["NCP_7_1_10.png", "NCP_7_1_8.png", "NCP_7_1_9.png"]  # by number, not by text
    _write(tmp_path, names)
    assert [p.name for p in list_slices(tmp_path)] == ["NCP_7_1_8.png", "NCP_7_1_9.png", "NCP_7_1_10.png"]


def test_gap_in_slice_numbers_is_refused(tmp_path):
    """Slices 13 and 14 missing: stacked as neighbours, every volume in mL would be too small."""
    _write(tmp_path / "gap", [f"NCP_X_1_{n:04d}.png" for n in (10, 11, 12, 15, 16)])
    with pytest.raises(ValueError, match="patient X scan 1: slices 12 and 15 .* 13-14 missing"):
        read_png_stack(tmp_path / "gap", window=(-1000, 200), spacing=(1, 1, 1))
    _write(tmp_path / "one", [f"CP_4_2_{n}.png" for n in (1, 3)])
    with pytest.raises(ValueError, match=r"slices 1 and 3 .*number\(s\) 2 missing"):
        list_slices(tmp_path / "one")
    _write(tmp_path / "twice", ["CP_4_2_7.png", "CP_4_2_007.png"])
    with pytest.raises(ValueError, match="slice number 7 occurs twice"):
        list_slices(tmp_path / "twice")


def test_hu_and_shape(tmp_path):
    _write(tmp_path, ["a1.png", "a2.png"], size=(8, 6), value=0)
    vol = read_png_stack(tmp_path, window=(-1000.0, 275.0), spacing=(0.5, 0.5, 4.0))
    assert vol.array.shape == (6, 8, 2)
    assert vol.array[..., 0].min() == pytest.approx(-1000.0) and vol.array[..., 1].max() == pytest.approx(-995.0)
    assert np.allclose(np.abs(np.diag(vol.affine)[:3]), [0.5, 0.5, 4.0])


def test_phantom_slices_stack_with_left_lung_on_the_left(tmp_path):
    """Slices written in display convention come back with the patient's left at -x (RAS)."""
    vol = make_chest_volume(seed=2, cls=0, shape=(64, 64, 6), orientation="LPS")  # LPS voxel order
    for z in range(6):
        Image.fromarray(hu_to_png(vol["image"][:, :, z].T)).save(tmp_path / f"0_1_1_{z:04d}.png")
    stacked = read_png_stack(tmp_path, window=LUNG_WINDOW, spacing=(0.75, 0.75, 2.5))
    assert stacked.array.shape == vol["image"].shape
    assert np.abs(stacked.array - np.clip(vol["image"], *LUNG_WINDOW)).max() <= 3.0  # 8-bit rounding
    assert np.array_equal(split_lungs(vol["lung"] > 0, stacked.affine), vol["lung"])


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_slices(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no slice pictures"):
        list_slices(tmp_path)
    _write(tmp_path / "mixed", ["NCP_1_1_0001.png", "NCP_2_1_0001.png"])
    with pytest.raises(ValueError, match="2 scans"):
        list_slices(tmp_path / "mixed")
    _write(tmp_path / "sizes", ["s1.png"], size=(8, 8))
    _write(tmp_path / "sizes", ["s2.png"], size=(9, 8))
    with pytest.raises(ValueError, match="s2.png: slice size"):
        read_png_stack(tmp_path / "sizes", window=(-1000, 200), spacing=(1, 1, 1))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "c1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="c1.png"):
        read_png_stack(tmp_path / "corrupt", window=(-1000, 200), spacing=(1, 1, 1))
