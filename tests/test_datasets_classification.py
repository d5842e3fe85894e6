"""Slice classification dataset: labels from names or COVIDx-CT split files, crops, bad input."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.classification import SliceClassificationDataset

NAMES = {"NCP_96_1328_0032.png": 2, "2_97_11_0001.png": 2, "CP_5_2_0010.png": 1, "1_6_3_0002.png": 1,
         "Normal_7_4_0100.png": 0, "0_8_1_0005.png": 0}


def slice_image(seed: int, height: int = 64, width: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def write_slices(folder, names) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for seed, name in enumerate(names):
        images[name] = slice_image(seed)
        Image.fromarray(images[name]).save(folder / name)
    return images


def write_split(path, lines) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_labels_and_meta_from_names(tmp_path):
    images = write_slices(tmp_path, NAMES)
    dataset = SliceClassificationDataset(tmp_path)
    assert len(dataset) == len(NAMES)
    for index, record in enumerate(dataset.records):
        image, label, meta = dataset[index]
        name = record["file"].rsplit("/", 1)[1]
        assert label == NAMES[name] and dataset.labels[index] == label
        assert image.shape == (3, 64, 80) and image.dtype == torch.float32
        np.testing.assert_allclose(image[1].numpy(), images[name] / 255.0, atol=1e-6)
        cls, patient, scan, slice_ = name[:-4].split("_")
        assert meta == {"file": record["file"], "patient": patient, "scan": scan, "slice": slice_}


def test_split_file_with_crop_and_resize(tmp_path):
    images = write_slices(tmp_path / "slices", ["NCP_1_1_0001.png", "Normal_2_1_0003.png"])
    write_split(tmp_path / "train_COVIDx_CT.txt", ["NCP_1_1_0001.png 2 10 5 50 45", "",
                                                   "# a comment", "Normal_2_1_0003.png 0 0 0 80 64"])
    plain = SliceClassificationDataset(tmp_path / "slices", split_file=tmp_path / "train_COVIDx_CT.txt")
    assert [r["box"] for r in plain.records] == [(10, 5, 50, 45), (0, 0, 80, 64)]
    assert plain[0][0].shape == (3, 64, 80) and plain.labels == [2, 0]
    cropped = SliceClassificationDataset(tmp_path / "slices", split_file=tmp_path / "train_COVIDx_CT.txt",
                                         crop_to_box=True)
    image, label, meta = cropped[0]
    assert label == 2 and meta["patient"] == "1" and image.shape == (3, 40, 40)
    np.testing.assert_allclose(image[0].numpy(), images["NCP_1_1_0001.png"][5:45, 10:50] / 255.0, atol=1e-6)
    resized = SliceClassificationDataset(tmp_path / "slices", split_file=tmp_path / "train_COVIDx_CT.txt",
                                         crop_to_box=True, image_size=32)
    assert resized[0][0].shape == (3, 32, 32) and resized[1][0].shape == (3, 32, 32)
    assert 0.0 <= resized[0][0].min() and resized[0][0].max() <= 1.0


def test_collate_and_transforms(tmp_path):
    write_slices(tmp_path, NAMES)
    dataset = SliceClassificationDataset(tmp_path, transforms=lambda image: image.flip(-1))
    images, labels, metas = next(iter(DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)))
    assert images.shape == (4, 3, 64, 80) and labels.dtype == torch.int64
    assert labels.tolist() == dataset.labels[:4]
    assert [m["file"] for m in metas] == [r["file"] for r in dataset.records[:4]]
    assert torch.equal(images[0], SliceClassificationDataset(tmp_path)[0][0].flip(-1))


# ------------------------------------------------------------------------------- bad input
def test_name_breaking_convention_named(tmp_path):
    write_slices(tmp_path, ["NCP_1_1_0001.png", "COVID-1-1.png"])
    with pytest.raises(ValueError, match=r"COVID-1-1\.png: file name does not follow"):
        SliceClassificationDataset(tmp_path)


def test_name_breaking_convention_in_split_file_names_the_line(tmp_path):
    write_slices(tmp_path, ["scan7.png"])
    write_split(tmp_path / "split.txt", ["scan7.png 2 0 0 10 10"])
    with pytest.raises(ValueError, match=r"split\.txt, line 1: .*scan7\.png: file name does not follow"):
        SliceClassificationDataset(tmp_path, split_file=tmp_path / "split.txt")


@pytest.mark.parametrize("line,problem", [
    ("NCP_1_1_0001.png 2 0 0 10", "expected 6 fields"),
    ("NCP_1_1_0001.png two 0 0 10 10", "must be integers"),
    ("NCP_1_1_0001.png 2 0 0 10.5 10", "must be integers"),
    ("NCP_1_1_0001.png 3 0 0 10 10", "class must be 0, 1 or 2"),
    ("NCP_1_1_0001.png 2 20 0 10 10", "0 <= xmin < xmax"),
    ("NCP_1_1_0001.png 0 0 0 10 10", "contradicts the file name"),
])
def test_malformed_split_line_names_file_and_line(tmp_path, line, problem):
    write_slices(tmp_path, ["NCP_1_1_0001.png", "NCP_1_1_0002.png"])
    write_split(tmp_path / "val.txt", ["NCP_1_1_0002.png 2 0 0 10 10", line])
    with pytest.raises(ValueError, match=rf"val\.txt, line 2: .*{re.escape(problem)}"):
        SliceClassificationDataset(tmp_path, split_file=tmp_path / "val.txt")


def test_listed_file_missing(tmp_path):
    write_slices(tmp_path, ["NCP_1_1_0001.png"])
    write_split(tmp_path / "test.txt", ["NCP_1_1_0001.png 2 0 0 10 10", "CP_2_1_0001.png 1 0 0 10 10"])
    with pytest.raises(FileNotFoundError, match=r"test\.txt, line 2: listed image not found: .*CP_2_1_0001\.png"):
        SliceClassificationDataset(tmp_path, split_file=tmp_path / "test.txt")


def test_duplicate_and_empty_split_files(tmp_path):
    write_slices(tmp_path, ["NCP_1_1_0001.png"])
    write_split(tmp_path / "dup.txt", ["NCP_1_1_0001.png 2 0 0 10 10"] * 2)
    with pytest.raises(ValueError, match=r"dup\.txt, line 2: .*already listed on line 1"):
        SliceClassificationDataset(tmp_path, split_file=tmp_path / "dup.txt")
    write_split(tmp_path / "empty.txt", ["# nothing"])
    with pytest.raises(ValueError, match=r"empty\.txt: empty split file"):
        SliceClassificationDataset(tmp_path, split_file=tmp_path / "empty.txt")


def test_empty_folder_named(tmp_path):
    (tmp_path / "readme.txt").write_text("no slices")
    with pytest.raises(ValueError, match=f"{tmp_path}: empty folder"):
        SliceClassificationDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SliceClassificationDataset(tmp_path / "nowhere")


def test_corrupt_image_and_box_outside_named(tmp_path):
    write_slices(tmp_path, ["NCP_1_1_0001.png"])
    (tmp_path / "CP_2_1_0001.png").write_bytes(b"garbage")
    write_split(tmp_path / "s.txt", ["NCP_1_1_0001.png 2 0 0 100 10", "CP_2_1_0001.png 1 0 0 10 10"])
    dataset = SliceClassificationDataset(tmp_path, split_file=tmp_path / "s.txt", crop_to_box=True)
    with pytest.raises(ValueError, match=r"NCP_1_1_0001\.png: box \(0, 0, 100, 10\) falls outside the 80x64"):
        dataset[0]
    with pytest.raises(ValueError, match=r"CP_2_1_0001\.png: cannot read image"):
        dataset[1]


def test_bad_arguments(tmp_path):
    write_slices(tmp_path, ["NCP_1_1_0001.png"])
    with pytest.raises(ValueError, match="crop_to_box needs a split_file"):
        SliceClassificationDataset(tmp_path, crop_to_box=True)
    with pytest.raises(ValueError, match="image_size"):
        SliceClassificationDataset(tmp_path, image_size=(0, 4))
