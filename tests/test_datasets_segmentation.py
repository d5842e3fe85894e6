"""CNCB segmentation dataset: instances, labels from mask values, pairing, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch.utils.data import DataLoader
from torchvision.ops import masks_to_boxes

from datasets.augmentation import SliceAugmentation
from datasets.conventions import MASK_CONSOLIDATION, MASK_GGO, MASK_LUNG
from datasets.segmentation import CNCBSegmentationDataset

SIZE = 64


def lesion_mask() -> np.ndarray:
    """Lung field with two GGO blobs and one consolidation blob that touches the second GGO."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:56, 4:60] = MASK_LUNG
    mask[10:20, 6:18] = MASK_GGO            # GGO instance A
    mask[30:40, 30:44] = MASK_GGO           # GGO instance B
    mask[40:48, 30:36] = MASK_CONSOLIDATION  # touches B
    return mask


def write_pair(root, stem, mask, image=None, *, image_suffix=".png"):
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = image if image is not None else (mask * 60).astype(np.uint8)
    Image.fromarray(image).save(root / "imgs" / f"{stem}{image_suffix}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def reference_instances(mask: np.ndarray, values) -> list[tuple[list[float], int]]:
    """Boxes (xyxy) and areas from pycocotools for a hand-listed set of instance masks."""
    out = []
    for region in values:
        rle = coco_mask.encode(np.asfortranarray(region.astype(np.uint8)))
        x, y, w, h = coco_mask.toBbox(rle).tolist()
        out.append(([x, y, x + w, y + h], int(coco_mask.area(rle))))
    return out


def test_both_labels_boxes_and_masks_against_pycocotools(tmp_path):
    mask = lesion_mask()
    write_pair(tmp_path, "NCP_1_1_0001", mask)
    image, target = CNCBSegmentationDataset(tmp_path, mask_type="both")[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(image[0].numpy(), (mask * 60) / 255.0, atol=1e-6)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    ggo_a, ggo_b, cons = np.zeros((3, SIZE, SIZE), bool)
    ggo_a[10:20, 6:18], ggo_b[30:40, 30:44], cons[40:48, 30:36] = True, True, True
    expected = reference_instances(mask, [ggo_a, ggo_b, cons])
    assert target["labels"].tolist() == [1, 1, 2] and target["labels"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [box for box, _ in expected]
    assert target["area"].tolist() == [area for _, area in expected]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, SIZE, SIZE)
    for got, want in zip(target["masks"], [ggo_a, ggo_b, cons]):
        assert np.array_equal(got.numpy().astype(bool), want)
    assert target["iscrowd"].tolist() == [0, 0, 0] and target["iscrowd"].dtype == torch.int64
    assert target["image_id"].dtype == torch.int64 and int(target["image_id"]) == 0


def test_ggo_and_merge_mask_types(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    _, ggo = CNCBSegmentationDataset(tmp_path, mask_type="ggo")[0]
    assert ggo["labels"].tolist() == [1, 1] and ggo["area"].tolist() == [120.0, 140.0]
    _, merged = CNCBSegmentationDataset(tmp_path, mask_type="merge")[0]
    assert merged["labels"].tolist() == [1, 1]  # B and the consolidation touching it are one instance
    assert merged["area"].tolist() == [120.0, 140.0 + 48.0]
    assert merged["boxes"][1].tolist() == [30.0, 30.0, 44.0, 48.0]


def test_consolidation_only_slice_is_label_2(tmp_path):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[5:60, 5:60] = MASK_LUNG
    mask[20:30, 20:34] = MASK_CONSOLIDATION
    write_pair(tmp_path, "CP_2_1_0007", mask)
    _, target = CNCBSegmentationDataset(tmp_path, mask_type="both")[0]
    assert target["labels"].tolist() == [2]
    _, target = CNCBSegmentationDataset(tmp_path, mask_type="ggo")[0]
    assert target["labels"].numel() == 0


def test_slice_without_lesion_gives_empty_target(tmp_path):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[5:60, 5:60] = MASK_LUNG
    write_pair(tmp_path, "Normal_3_1_0001", mask)
    _, target = CNCBSegmentationDataset(tmp_path)[0]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["masks"].shape == (0, SIZE, SIZE) and target["masks"].dtype == torch.uint8
    assert target["labels"].shape == (0,) and target["area"].shape == (0,) and target["iscrowd"].shape == (0,)


def test_min_area_drops_small_components(tmp_path):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[10:20, 10:20] = MASK_GGO
    mask[40, 40:43] = MASK_GGO  # 3 pixels
    mask[50, 50] = MASK_GGO
    mask[51, 51] = MASK_GGO  # diagonal neighbour: one 8-connected component of 2 pixels
    write_pair(tmp_path, "a", mask)
    assert CNCBSegmentationDataset(tmp_path, min_area=10)[0][1]["area"].tolist() == [100.0]
    assert CNCBSegmentationDataset(tmp_path, min_area=1)[0][1]["area"].tolist() == [100.0, 3.0, 2.0]


def test_pairing_by_stem_and_rgb_input(tmp_path):
    """Each image is paired with the mask of its own stem, whatever the extension or order."""
    stems = ["10", "9", "b", "A"]
    for n, stem in enumerate(stems):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4 + 10 * n: 12 + 10 * n, 4:12] = MASK_GGO
        rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
        rgb[mask == MASK_GGO] = 255  # the image is bright exactly where its own mask has the lesion
        write_pair(tmp_path, stem, mask, rgb, image_suffix=".jpg" if n % 2 else ".png")
    dataset = CNCBSegmentationDataset(tmp_path)
    assert sorted(dataset.names) == sorted(stems) and len(dataset) == 4
    for index, name in enumerate(dataset.names):
        image, target = dataset[index]
        assert dataset.image_paths[index].stem == dataset.mask_paths[index].stem == name
        y0 = 4 + 10 * stems.index(name)
        assert target["boxes"].tolist() == [[4.0, float(y0), 12.0, float(y0 + 8)]]
        assert image[:, y0 + 2:y0 + 6, 6:10].min() > 0.9 and image[:, y0 + 2:y0 + 6, 20:].max() < 0.1


def test_collate_fn_with_dataloader(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    write_pair(tmp_path, "b", np.zeros((SIZE, SIZE), np.uint8))
    dataset = CNCBSegmentationDataset(tmp_path)
    images, targets = next(iter(DataLoader(dataset, batch_size=2, collate_fn=dataset.collate_fn)))
    assert len(images) == 2 and [len(t["boxes"]) for t in targets] == [3, 0]
    assert [int(t["image_id"]) for t in targets] == [0, 1]


def test_transforms_receive_image_and_target(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())

    def hflip(image, target):
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = SIZE - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}

    plain = CNCBSegmentationDataset(tmp_path)[0]
    image, target = CNCBSegmentationDataset(tmp_path, transforms=hflip)[0]
    assert torch.equal(image, plain[0].flip(-1)) and target["boxes"][0].tolist() == [46.0, 10.0, 58.0, 20.0]


def test_dataset_is_not_augmented_unless_asked(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    dataset = CNCBSegmentationDataset(tmp_path)
    torch.manual_seed(0)
    first = dataset[0]
    torch.manual_seed(1)
    second = dataset[0]
    assert dataset.transforms is None and torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_augmented_slices_keep_tight_boxes_and_repeat_with_the_seed(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    plain = CNCBSegmentationDataset(tmp_path)[0]
    dataset = CNCBSegmentationDataset(tmp_path, transforms=SliceAugmentation())
    outputs = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        image, target = dataset[0]
        outputs.append(image)
        assert image.shape == (3, SIZE, SIZE) and 0.0 <= image.min() and image.max() <= 1.0
        assert target["labels"].tolist() == [1, 1, 2] and target["masks"].dtype == torch.uint8
        reference = masks_to_boxes(target["masks"].bool()) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        assert torch.equal(target["boxes"], reference)
        assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())
    assert torch.equal(outputs[0], outputs[1])
    assert any(not torch.equal(out, plain[0]) for out in outputs[2:])


# ------------------------------------------------------------------------------- bad input
def test_corrupt_image_names_the_file(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    (tmp_path / "imgs" / "a.png").write_bytes(b"\x89PNG broken")
    dataset = CNCBSegmentationDataset(tmp_path)
    with pytest.raises(ValueError, match=r"imgs/a\.png.*corrupt"):
        dataset[0]


def test_mask_size_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match=r"masks/a\.png has size 48x32.*imgs/a\.png has 64x64"):
        CNCBSegmentationDataset(tmp_path)[0]


def test_mask_values_out_of_range_named(tmp_path):
    mask = lesion_mask()
    mask[0, 0], mask[0, 1] = 5, 255
    write_pair(tmp_path, "a", mask)
    with pytest.raises(ValueError, match=r"masks/a\.png has values \[5, 255\] outside \[0, 1, 2, 3\]"):
        CNCBSegmentationDataset(tmp_path)[0]


def test_image_without_mask_named(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "imgs" / "lonely.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask: .*imgs/lonely\.png"):
        CNCBSegmentationDataset(tmp_path)


def test_mask_without_image_named(tmp_path):
    write_pair(tmp_path, "a", lesion_mask())
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "masks" / "orphan.png")
    with pytest.raises(ValueError, match=r"1 mask\(s\) without an image: .*masks/orphan\.png"):
        CNCBSegmentationDataset(tmp_path)


def test_empty_and_missing_folders_named(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{tmp_path / 'imgs'}: empty folder"):
        CNCBSegmentationDataset(tmp_path)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match=f"{tmp_path / 'masks'}: empty folder"):
        CNCBSegmentationDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="folder not found: .*gt"):
        CNCBSegmentationDataset(tmp_path, masks_dir="gt")


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_type must be one of"):
        CNCBSegmentationDataset("anywhere", mask_type="lesion")
    with pytest.raises(ValueError, match="min_area"):
        CNCBSegmentationDataset("anywhere", min_area=0)
