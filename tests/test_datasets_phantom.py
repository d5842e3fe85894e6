"""Every loader reads every output of the phantom generator (a tiny set: 64 px slices, small volumes)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from datasets.classification import SliceClassificationDataset
from datasets.conventions import MASK_TYPE_LABELS
from datasets.io import NotHUWarning, read_mask, read_nifti
from datasets.segmentation import CNCBSegmentationDataset
from datasets.volumes import list_sections, load_datalist

SIZE = 64


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from datasets.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("phantom")
    summary = generate_dataset(out, seed=3, n_patients=6, n_seg_patients=3, slices_per_patient=2, image_size=SIZE,
                               volume_shape=(32, 32, 12), n_volumes=3, n_abdomen=1, abdomen_shape=(32, 32, 16),
                               montage=False)
    return out, summary


@pytest.mark.parametrize("mask_type", sorted(MASK_TYPE_LABELS))
def test_segmentation_sets_read_and_match_mask_values(phantom, mask_type):
    out, _ = phantom
    for split in ("train", "test"):
        dataset = CNCBSegmentationDataset(out / "seg" / split, mask_type=mask_type, min_area=1)
        assert len(dataset) > 0
        for index in range(len(dataset)):
            image, target = dataset[index]
            assert image.shape == (3, SIZE, SIZE) and 0 <= image.min() and image.max() <= 1
            _check_instances(read_mask(dataset.mask_paths[index]), target, MASK_TYPE_LABELS[mask_type])


def _check_instances(mask: np.ndarray, target: dict, label_of_value: dict[int, int]) -> None:
    """With min_area=1 the instances of each label tile exactly the pixels whose value maps to it."""
    masks, labels, boxes = target["masks"].bool().numpy(), target["labels"].tolist(), target["boxes"]
    assert boxes.shape == (len(labels), 4) and masks.shape == (len(labels), SIZE, SIZE)
    assert bool((boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= SIZE).all())
    for label in set(label_of_value.values()):
        expected = np.isin(mask, [v for v, lab in label_of_value.items() if lab == label])
        own = masks[[lab == label for lab in labels]]
        assert np.array_equal(own.any(0) if len(own) else np.zeros_like(expected), expected)
        assert int(own.sum()) == int(expected.sum())  # instances do not overlap


def test_phantom_segmentation_has_lesions(phantom):
    out, _ = phantom
    labels = []
    for split in ("train", "test"):
        dataset = CNCBSegmentationDataset(out / "seg" / split)
        labels += [lab for i in range(len(dataset)) for lab in dataset[i][1]["labels"].tolist()]
    assert labels and set(labels) <= {1, 2}


def test_classification_by_name_and_by_split_file(phantom):
    out, summary = phantom
    for split, split_file in summary["cls"]["split_files"].items():
        by_name = SliceClassificationDataset(out / "cls" / split)
        by_file = SliceClassificationDataset(out / "cls" / split, split_file=split_file, crop_to_box=True,
                                             image_size=32)
        lines = [line for line in open(split_file).read().splitlines() if line.strip()]
        assert len(by_file) == len(lines) == len(by_name)
        assert sorted(zip([r["file"] for r in by_name.records], by_name.labels)) == \
            sorted(zip([r["file"] for r in by_file.records], by_file.labels))
        for index in range(len(by_file)):
            image, label, meta = by_file[index]
            assert image.shape == (3, 32, 32) and label in (0, 1, 2) and meta["patient"]
            assert by_name[index][0].shape == (3, SIZE, SIZE)


def test_every_datalist_section_and_volume_reads(phantom):
    out, _ = phantom
    datalists = sorted((out / "volumes").glob("*.json")) + [out / "abdomen" / "dataset.json"]
    assert len(datalists) >= 4
    for datalist in datalists:
        for section in list_sections(datalist):
            for entry in load_datalist(datalist, section=section):
                _check_case(entry)


def _check_case(entry: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotHUWarning)
        image = read_nifti(entry["image"])
    assert image.array.ndim == 3 and image.array.min() < -500
    for key in ("label", "label_image"):
        if isinstance(entry.get(key), str):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotHUWarning)  # a label map is not HU
                label = read_nifti(entry[key])
            assert label.array.shape == image.array.shape, entry[key]
            np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
            assert torch.equal(torch.from_numpy(label.array), torch.from_numpy(label.array).round())
        elif key == "label" and key in entry:
            assert entry[key] in (0, 1)
