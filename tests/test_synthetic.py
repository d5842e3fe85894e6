"""The chest-CT phantom: HU per tissue, class patterns, label maps, geometry, layouts and splits."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from datasets.conventions import CLASS_PREFIXES, hu_to_png, parse_slice_name
from datasets.synthetic import (
    LUNG_LEFT,
    LUNG_RIGHT,
    ORGAN_NAMES,
    TISSUE_BONE,
    TISSUE_FAT,
    TISSUE_LUNG,
    generate_dataset,
    make_abdomen_volume,
    make_chest_slice,
    make_chest_volume,
    make_patient,
)

SIZE = 64
VOLUME = (48, 48, 12)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    summary = generate_dataset(out, seed=1, n_patients=6, n_seg_patients=6, slices_per_patient=3, image_size=SIZE,
                               volume_shape=VOLUME, n_volumes=4, n_abdomen=2, abdomen_shape=(32, 32, 12))
    return out, summary


def _eroded(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_erosion(mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slice_hu_per_tissue(seed):
    s = make_chest_slice(seed=seed, size=(128, 128), cls=0, t=0.5)
    hu, tissue = s["image"], s["tissue"]
    assert hu.dtype == np.float32 and s["mask"].dtype == np.uint8 and hu.shape == (128, 128)
    parenchyma = _eroded(tissue == TISSUE_LUNG)
    assert -900 <= hu[parenchyma].mean() <= -800
    assert 10 < hu[parenchyma].std() < 250  # textured, with vessels
    assert hu[tissue == TISSUE_BONE].mean() > 300
    assert -150 <= hu[_eroded(tissue == TISSUE_FAT)].mean() <= -50
    outside = ~ndimage.binary_dilation(tissue > 0, iterations=3)
    assert abs(hu[outside].mean() + 1000) < 15
    assert 5 < hu[outside].std() < 40  # scanner noise


def test_lesion_hu_bands():
    ggo, cons = [], []
    for seed in range(6):
        for cls in (1, 2):
            s = make_chest_slice(seed=seed, size=(160, 160), cls=cls)
            ggo += s["image"][_eroded(s["mask"] == 2)].tolist()
            cons += s["image"][_eroded(s["mask"] == 3)].tolist()
    assert len(ggo) > 50 and len(cons) > 50
    assert -750 <= np.mean(ggo) <= -300
    assert -150 <= np.mean(cons) <= 60


def test_masks_values_and_lesions_inside_lungs():
    for seed in range(3):
        for cls in (0, 1, 2):
            s = make_chest_slice(seed=seed, size=(SIZE, SIZE), cls=cls)
            assert set(np.unique(s["mask"]).tolist()) <= {0, 1, 2, 3}
            assert np.all(s["lung"][s["lesion"] > 0] > 0)
            assert np.array_equal(s["mask"] > 0, s["lung"] > 0)
            if cls == 0:
                assert s["mask"].max() <= 1


def _lesion_voxels_per_lung(seed: int, cls: int) -> tuple[int, int]:
    vol = make_chest_volume(seed=seed, shape=(64, 64, 24), spacing=(0.7, 0.7, 2.5), cls=cls)
    assert np.all(vol["lung"][vol["lesion"] > 0] > 0), "a lesion voxel lies outside the lungs"
    lesion = vol["lesion"] > 0
    return int((lesion & (vol["lung"] == LUNG_LEFT)).sum()), int((lesion & (vol["lung"] == LUNG_RIGHT)).sum())


def test_class_patterns():
    for seed in range(3):
        assert make_chest_volume(seed=seed, shape=(48, 48, 12), spacing=(0.7, 0.7, 3.0), cls=0)["lesion"].max() == 0
        left, right = _lesion_voxels_per_lung(seed, 2)
        assert left > 0 and right > 0, f"COVID-19 seed {seed} is not bilateral"
    unilateral = 0
    for seed in range(6):
        counts = _lesion_voxels_per_lung(seed, 1)
        assert max(counts) > 0
        unilateral += min(counts) < 0.1 * max(counts)
    assert unilateral >= 4, "CP should be mostly unilateral"


def test_patients_share_anatomy_and_seeds_differ():
    a = make_chest_slice(seed=4, size=(SIZE, SIZE), cls=2, t=0.4)
    b = make_chest_slice(seed=4, size=(SIZE, SIZE), cls=2, t=0.4)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    other = make_chest_slice(seed=5, size=(SIZE, SIZE), cls=2, t=0.4)
    assert not np.array_equal(a["mask"], other["mask"])
    # neighbouring slices of one patient overlap far more than the same level of two patients
    near = make_chest_slice(seed=4, size=(SIZE, SIZE), cls=2, t=0.42)
    assert _dice(a["mask"] > 0, near["mask"] > 0) > _dice(a["mask"] > 0, other["mask"] > 0)
    p, q = make_patient(seed=4, cls=2), make_patient(seed=4, cls=2)
    np.testing.assert_array_equal(p.vessels.points, q.vessels.points)
    assert [les.centre.tolist() for les in p.lesions] == [les.centre.tolist() for les in q.lesions]


def _dice(x: np.ndarray, y: np.ndarray) -> float:
    return 2 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0)


def test_lung_size_varies_along_z_and_between_patients():
    vol = make_chest_volume(seed=0, shape=(48, 48, 24), spacing=(0.7, 0.7, 2.5), cls=0)
    per_slice = (vol["lung"] > 0).sum((0, 1))
    assert per_slice.max() > 3 * max(per_slice[-1], 1)  # narrowing toward the apex
    areas = [(make_chest_slice(seed=s, size=(SIZE, SIZE), cls=0, t=0.5)["lung"] > 0).sum() for s in range(4)]
    assert len(set(areas)) == 4


@pytest.mark.parametrize("orientation, codes", [("RAS", ("R", "A", "S")), ("LPS", ("L", "P", "S"))])
def test_volume_orientation_and_laterality(orientation, codes):
    vol = make_chest_volume(seed=2, shape=(48, 40, 12), spacing=(0.8, 0.8, 3.0), cls=2, orientation=orientation)
    assert vol["image"].dtype == np.int16 and vol["lung"].dtype == np.uint8 and vol["lesion"].dtype == np.uint8
    assert vol["image"].shape == (48, 40, 12) and vol["affine"].shape == (4, 4)
    assert nib.aff2axcodes(vol["affine"]) == codes
    np.testing.assert_allclose(np.abs(np.diag(vol["affine"])[:3]), (0.8, 0.8, 3.0))
    world_x = {}
    for label in (LUNG_LEFT, LUNG_RIGHT):
        centre = np.argwhere(vol["lung"] == label).mean(0)
        world_x[label] = (vol["affine"] @ np.append(centre, 1.0))[0]
    assert world_x[LUNG_RIGHT] > world_x[LUNG_LEFT]  # RAS+ world: +x is the patient's right
    assert set(np.unique(vol["lesion"]).tolist()) <= {0, 1, 2}


def test_ras_and_lps_volumes_are_the_same_scan():
    ras, lps = (make_chest_volume(seed=3, shape=(32, 32, 8), spacing=(0.7, 0.7, 2.0), cls=1, orientation=o)
                for o in ("RAS", "LPS"))
    canon = [nib.as_closest_canonical(nib.Nifti1Image(v["image"], v["affine"])) for v in (ras, lps)]
    np.testing.assert_array_equal(np.asarray(canon[0].dataobj), np.asarray(canon[1].dataobj))
    np.testing.assert_allclose(canon[0].affine, canon[1].affine, atol=1e-6)


def test_abdomen_volume():
    vol = make_abdomen_volume(seed=0, shape=(64, 64, 32), spacing=(0.8, 0.8, 2.5))
    assert vol["image"].dtype == np.int16 and vol["label"].dtype == np.uint8
    assert len(ORGAN_NAMES) == 14 and ORGAN_NAMES[1] == "spleen" and ORGAN_NAMES[6] == "liver"
    assert set(np.unique(vol["label"]).tolist()) == set(range(14))
    hu, label = vol["image"], vol["label"]
    assert 60 < hu[label == 6].mean() < 160  # enhanced liver
    assert np.median(hu[label == 8]) > np.median(hu[label == 6])  # enhanced aorta brighter than liver
    assert np.median(hu[label == 4]) < 40  # gallbladder fluid
    assert nib.aff2axcodes(vol["affine"]) == ("R", "A", "S")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="cls must be"):
        make_chest_slice(seed=0, size=(SIZE, SIZE), cls=3)
    with pytest.raises(ValueError, match="orientation"):
        make_chest_volume(seed=0, shape=(32, 32, 8), spacing=(1, 1, 1), cls=0, orientation="XYZ")
    with pytest.raises(ValueError, match="shape"):
        make_chest_volume(seed=0, shape=(32, 32), spacing=(1, 1, 1), cls=0)
    with pytest.raises(ValueError, match="spacing"):
        make_abdomen_volume(seed=0, shape=(32, 32, 8), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="size must be"):
        make_chest_slice(seed=0, size=(8, 8), cls=0)
    with pytest.raises(ValueError, match="outputs"):
        generate_dataset("/nonexistent", outputs=("seg", "dicom"))
    with pytest.raises(ValueError, match="image_size"):
        generate_dataset("/nonexistent", image_size=16)
    with pytest.raises(ValueError, match="volume_fractions"):
        generate_dataset("/nonexistent", volume_fractions=(0.5, 0.2, 0.2))


def test_volume_splits_set_the_test_share(tmp_path):
    summary = generate_dataset(tmp_path, seed=2, n_volumes=10, volume_fractions=(0.4, 0.2, 0.4),
                               volume_shape=(24, 24, 6), outputs=("volumes",), montage=False)
    assert summary["volumes"]["counts"] == {"training": 4, "validation": 2, "test": 4}


def test_seg_layout_and_lesion_mix(phantom):
    out, _ = phantom
    kinds, patients = set(), {}
    for split in ("train", "val", "test"):
        imgs = sorted(p.name for p in (out / "seg" / split / "imgs").glob("*.png"))
        patients[split] = {name.split("_")[1] for name in imgs}
        masks = sorted(p.name for p in (out / "seg" / split / "masks").glob("*.png"))
        assert imgs and imgs == masks
        for name in masks:
            parse_slice_name(name)
            mask = np.asarray(Image.open(out / "seg" / split / "masks" / name))
            image = np.asarray(Image.open(out / "seg" / split / "imgs" / name))
            assert mask.dtype == np.uint8 and image.dtype == np.uint8 and mask.shape == image.shape == (SIZE, SIZE)
            values = set(np.unique(mask).tolist())
            assert values <= {0, 1, 2, 3}
            kinds.add((2 in values, 3 in values))
    assert {(False, False), (False, True), (True, True)} <= kinds  # none, consolidation only, both
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"]), "a patient in two splits"


def test_cls_split_files(phantom):
    out, summary = phantom
    for split in ("train", "val", "test"):
        lines = (out / "cls" / f"{split}_COVIDx_CT.txt").read_text().splitlines()
        assert lines and len(lines) == len(list((out / "cls" / split).glob("*.png")))
        for line in lines:
            name, cls, *box = line.split(" ")
            assert len(box) == 4 and (out / "cls" / split / name).is_file()
            assert int(cls) == CLASS_PREFIXES[name.split("_")[0]] == parse_slice_name(name).label
            xmin, ymin, xmax, ymax = map(int, box)
            assert 0 <= xmin < xmax <= SIZE and 0 <= ymin < ymax <= SIZE
            body = np.asarray(Image.open(out / "cls" / split / name)) > hu_to_png(np.array(-500.0))
            assert body[ymin:ymax, xmin:xmax].sum() > 0.95 * body.sum()


def test_no_patient_in_two_splits(phantom):
    out, _ = phantom
    owners: dict[tuple[str, str], set] = {}
    for path in (out / "seg").glob("*/imgs/*.png"):
        owners.setdefault(("seg", parse_slice_name(path).patient), set()).add(path.parent.parent.name)
    for path in (out / "cls").glob("*/*.png"):
        owners.setdefault(("cls", parse_slice_name(path).patient), set()).add(path.parent.name)
    assert owners and all(len(splits) == 1 for splits in owners.values()), owners
    seg = {p for kind, p in owners if kind == "seg"}
    assert seg and not seg & {p for kind, p in owners if kind == "cls"}
    datalist = json.loads((out / "volumes" / "dataset.json").read_text())
    seen = [e["image"] for section in ("training", "validation", "test") for e in datalist[section]]
    assert len(seen) == len(set(seen)) == 4


def test_datalists_resolve(phantom):
    out, _ = phantom
    for path in [*(out / "volumes").glob("dataset*.json"), out / "abdomen" / "dataset.json"]:
        content = json.loads(path.read_text())
        assert {"training", "validation", "test", "labels"} <= set(content)
        for entry in (e for section in ("training", "validation", "test") for e in content[section]):
            for key in ("image", "label", "label_image"):
                if isinstance(entry.get(key), str):
                    assert (path.parent / entry[key]).is_file(), f"{path}: {entry[key]}"
    covid = json.loads((out / "volumes" / "dataset_covid.json").read_text())
    for entry in covid["training"] + covid["validation"] + covid["test"]:
        assert set(entry) == {"image", "label_image", "label", "class"}
        assert entry["label"] == int(entry["class"] == "COVID-19")
        img = nib.load(out / "volumes" / entry["image"])
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.affine, nib.load(out / "volumes" / entry["label_image"]).affine)
        zooms = img.header.get_zooms()
        assert 0.6 <= zooms[0] == zooms[1] <= 0.9 and 1.0 <= zooms[2] <= 5.0


def test_volume_orientations_mixed(phantom):
    out, _ = phantom
    codes = {nib.aff2axcodes(nib.load(p).affine) for p in (out / "volumes" / "imagesTr").glob("*.nii.gz")}
    assert codes == {("R", "A", "S"), ("L", "P", "S")}


def test_generation_is_deterministic(phantom, tmp_path):
    out, _ = phantom
    generate_dataset(tmp_path, seed=1, n_patients=6, n_seg_patients=6, slices_per_patient=3, image_size=SIZE,
                     volume_shape=VOLUME, n_volumes=4, n_abdomen=2, abdomen_shape=(32, 32, 12),
                     outputs=("seg", "volumes"),
                     montage=False, workers=2)
    for rel in ["seg/train/masks", "seg/train/imgs", "volumes/imagesTr"]:
        names = sorted(p.name for p in (out / rel).iterdir())
        assert names == sorted(p.name for p in (tmp_path / rel).iterdir())
        for name in names:
            a, b = _pixels(out / rel / name), _pixels(tmp_path / rel / name)
            np.testing.assert_array_equal(a, b)
    generate_dataset(tmp_path / "other", seed=2, n_seg_patients=6, slices_per_patient=3, image_size=SIZE,
                     outputs=("seg",), montage=False)
    ours = {p.name: _pixels(p) for p in (out / "seg").rglob("masks/*.png")}
    theirs = {p.name: _pixels(p) for p in (tmp_path / "other" / "seg").rglob("masks/*.png")}
    assert ours.keys() != theirs.keys() or any(not np.array_equal(ours[k], theirs[k]) for k in ours)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) if path.name.endswith(".nii.gz") else np.asarray(Image.open(path))


def test_montages_and_summary(phantom):
    out, summary = phantom
    for name in ("montage.png", "montage_volumes.png"):
        picture = Image.open(out / name)
        assert picture.size[0] > 400 and picture.size[1] > 400
    assert json.loads((out / "summary.json").read_text())["seed"] == 1
    assert sum(summary["seg"]["slices"].values()) == 18 and sum(summary["cls"]["slices"].values()) == 18


def test_cli_flags_state_defaults():
    from make_synthetic_data import get_args_parser

    for action in get_args_parser()._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.dest
