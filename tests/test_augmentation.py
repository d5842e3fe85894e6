"""Slice augmentation: boxes stay the tight boxes of their masks, labels follow masks, seeded repeats."""
from __future__ import annotations

import pytest
import torch
from scipy import ndimage
from torchvision.ops import masks_to_boxes

from datasets.augmentation import SliceAugmentation, hflip, intensity, tight_boxes, zoom

SIZE = 64
INTENSITY_OF_LABEL = {1: 0.4, 2: 0.8}


def slice_sample(blocks=((1, 10, 20, 6, 18), (1, 30, 40, 30, 44), (2, 44, 52, 50, 60))):
    """Image and target with one rectangular instance per (label, y0, y1, x0, x1); image codes the label."""
    masks = torch.zeros((len(blocks), SIZE, SIZE), dtype=torch.uint8)
    image = torch.zeros((3, SIZE, SIZE))
    for n, (label, y0, y1, x0, x1) in enumerate(blocks):
        masks[n, y0:y1, x0:x1] = 1
        image[:, y0:y1, x0:x1] = INTENSITY_OF_LABEL[label]
    target = {"boxes": torch.tensor([[x0, y0, x1, y1] for _, y0, y1, x0, x1 in blocks], dtype=torch.float32)
              .reshape(-1, 4),
              "labels": torch.tensor([b[0] for b in blocks], dtype=torch.int64),
              "masks": masks, "area": masks.flatten(1).sum(1).float(),
              "iscrowd": torch.zeros(len(blocks), dtype=torch.int64), "image_id": torch.tensor(7)}
    return image, target


def reference_boxes(masks: torch.Tensor) -> torch.Tensor:
    """torchvision's tight boxes (x2 = last column) in the dataset's convention (x2 = last column + 1)."""
    return masks_to_boxes(masks.bool()) + torch.tensor([0.0, 0.0, 1.0, 1.0])


def assert_valid(image, target, *, n=None):
    """The dataset's contract, and every box the tight box of its mask."""
    masks = target["masks"]
    count = masks.shape[0]
    assert n is None or count == n
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert masks.dtype == torch.uint8 and masks.shape == (count, SIZE, SIZE) and set(masks.unique().tolist()) <= {0, 1}
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (count, 4)
    assert torch.equal(target["boxes"], reference_boxes(masks))
    assert target["labels"].dtype == torch.int64 and target["labels"].shape == (count,)
    assert torch.equal(target["area"], masks.flatten(1).sum(1).float())
    assert target["iscrowd"].shape == (count,) and int(target["image_id"]) == 7


def assert_labels_follow_masks(image, target):
    """Inside each mask (2 px from its edge) the image has the intensity coded for the mask's label."""
    values = {}
    for mask, label in zip(target["masks"], target["labels"].tolist()):
        inner = torch.from_numpy(ndimage.binary_erosion(mask.numpy(), iterations=2))
        assert inner.any()
        values.setdefault(label, []).append(image[0][inner])
    for label, pixels in values.items():
        pixels = torch.cat(pixels)
        assert pixels.max() - pixels.min() < 1e-5, f"label {label} covers differing intensities"
    return {label: float(torch.cat(p)[0]) for label, p in values.items()}


def test_tight_boxes_hand_computed_and_against_torchvision():
    image, target = slice_sample()
    assert tight_boxes(target["masks"]).tolist() == [[6, 10, 18, 20], [30, 30, 44, 40], [50, 44, 60, 52]]
    masks = (torch.rand(5, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) > 0.99).to(torch.uint8)
    masks[:, 3, 5] = 1
    assert torch.equal(tight_boxes(masks), reference_boxes(masks))
    assert tight_boxes(masks[:0]).shape == (0, 4)


def test_hflip_moves_boxes_with_masks_and_twice_is_identity():
    image, target = slice_sample()
    flipped, moved = hflip(image, target)
    assert_valid(flipped, moved, n=3)
    assert moved["boxes"][0].tolist() == [SIZE - 18, 10, SIZE - 6, 20]
    assert_labels_follow_masks(flipped, moved) == pytest.approx(INTENSITY_OF_LABEL)
    back, again = hflip(flipped, moved)
    assert torch.equal(back, image) and all(torch.equal(again[k], target[k]) for k in target)


def test_zoom_hand_computed_boxes():
    image, target = slice_sample([(1, 24, 32, 28, 36)])
    _, bigger = zoom(image, target, 2.0)  # 128 px, centre crop from 32
    assert bigger["boxes"].tolist() == [[24, 16, 40, 32]] and bigger["area"].tolist() == [256.0]
    _, smaller = zoom(image, target, 0.5)  # 32 px, padded by 16
    assert smaller["boxes"].tolist() == [[30, 28, 34, 32]] and smaller["area"].tolist() == [16.0]
    same, unchanged = zoom(image, target, 1.0)
    assert torch.equal(same, image) and torch.equal(unchanged["masks"], target["masks"])


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.0, 1.05, 1.1, 1.37])
def test_zoom_keeps_boxes_tight_and_labels_on_their_masks(factor):
    image, target = slice_sample()
    zoomed, moved = zoom(image, target, factor)
    assert_valid(zoomed, moved, n=3)
    assert assert_labels_follow_masks(zoomed, moved) == pytest.approx(INTENSITY_OF_LABEL)


def test_zoom_drops_vanished_instances_with_their_labels():
    image, target = slice_sample([(2, 0, 3, 0, 3), (1, 24, 36, 24, 36)])  # the label-2 corner leaves the canvas
    zoomed, moved = zoom(image, target, 1.1)
    assert_valid(zoomed, moved, n=1)
    assert moved["labels"].tolist() == [1] and assert_labels_follow_masks(zoomed, moved) == pytest.approx({1: 0.4})


def test_intensity_jitter_stays_in_range_and_keeps_order():
    image, _ = slice_sample()
    assert torch.equal(intensity(image, brightness=0.0, contrast=0.0), image)
    out = intensity(image, brightness=0.1, contrast=0.1)
    mean = image.mean()
    torch.testing.assert_close(out, ((image - mean) * 1.1 + mean + 0.1).clamp(0, 1))
    clipped = intensity(image, brightness=0.9, contrast=0.5)
    assert clipped.min() >= 0.0 and clipped.max() == 1.0
    assert intensity(image, brightness=-0.9, contrast=0.0).max() == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_composition_keeps_contract_and_alignment(seed):
    image, target = slice_sample()
    torch.manual_seed(seed)
    out, moved = SliceAugmentation(scale_range=(0.9, 1.1))(image, target)
    assert_valid(out, moved, n=3)
    values = assert_labels_follow_masks(out, moved)
    assert values[2] > values[1]  # the contrast change is monotone: label 2 stays the brighter


def test_composition_of_empty_slice_stays_empty():
    image, target = slice_sample(())
    for seed in range(4):
        torch.manual_seed(seed)
        out, moved = SliceAugmentation(scale_range=(0.5, 1.5))(image, target)
        assert_valid(out, moved, n=0)
    for op in (hflip, lambda i, t: zoom(i, t, 1.1), lambda i, t: zoom(i, t, 0.9)):
        assert_valid(*op(image, target), n=0)


def test_same_seed_same_output_and_inputs_untouched():
    image, target = slice_sample()
    copies = image.clone(), {k: v.clone() for k, v in target.items()}
    augment = SliceAugmentation()
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(augment(image, target))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    assert not torch.equal(runs[0][0], runs[2][0])
    assert torch.equal(image, copies[0]) and all(torch.equal(target[k], copies[1][k]) for k in target)


def test_draws_cover_the_ranges():
    augment = SliceAugmentation(hflip_p=0.5, scale_range=(0.9, 1.1), brightness=0.1, contrast=0.2)
    torch.manual_seed(0)
    draws = [augment.draw() for _ in range(400)]
    flips = sum(d[0] for d in draws)
    assert 150 < flips < 250
    assert all(0.9 <= d[1] <= 1.1 and -0.1 <= d[2] <= 0.1 and -0.2 <= d[3] <= 0.2 for d in draws)
    assert not any(SliceAugmentation(hflip_p=0.0).draw()[0] for _ in range(50))


@pytest.mark.parametrize("kwargs, name", [({"hflip_p": 1.5}, "hflip_p"), ({"scale_range": (1.1, 0.9)}, "scale_range"),
                                          ({"scale_range": (0.0, 1.0)}, "scale_range"),
                                          ({"brightness": -0.1}, "brightness"), ({"contrast": 1.0}, "contrast")])
def test_bad_settings_named(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} out of range, got"):
        SliceAugmentation(**kwargs)
