"""dataset.json datalists: path resolution (against MONAI's reader), numeric labels, bad input."""
from __future__ import annotations

import json
import os

import pytest

from datasets.volumes import list_sections, load_datalist


@pytest.fixture
def datalist(tmp_path):
    for name in ("imagesTr/a.nii.gz", "imagesTr/b.nii.gz", "labelsTr/a.nii.gz", "labelsTr/b.nii.gz",
                 "lungs/b.nii.gz", "imagesTs/c.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    document = {
        "name": "phantom", "labels": {"0": "background", "1": "lesion"},
        "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"},
                     {"image": "./imagesTr/b.nii.gz", "label": "labelsTr/../labelsTr/b.nii.gz"}],
        "validation": [{"image": "imagesTr/b.nii.gz", "label_image": "lungs/b.nii.gz", "label": 1}],
        "test": ["imagesTs/c.nii.gz"],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(document))
    return path


def test_segmentation_section_matches_monai_reader(datalist):
    from monai.data import load_decathlon_datalist

    ours = load_datalist(datalist, section="training")
    monai = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key="training")
    assert [{k: os.path.normpath(v) for k, v in e.items()} for e in monai] == ours
    assert all(os.path.isabs(e["image"]) and os.path.isabs(e["label"]) for e in ours)
    assert ours[1]["label"] == str(datalist.parent / "labelsTr" / "b.nii.gz")


def test_classification_section_keeps_numeric_label(datalist):
    (entry,) = load_datalist(datalist, section="validation")
    assert entry["label"] == 1 and isinstance(entry["label"], int)
    assert entry["label_image"] == str(datalist.parent / "lungs" / "b.nii.gz")
    assert entry["image"] == str(datalist.parent / "imagesTr" / "b.nii.gz")


def test_bare_paths_data_root_and_sections(datalist, tmp_path):
    assert load_datalist(datalist, section="test") == [{"image": str(tmp_path / "imagesTs" / "c.nii.gz")}]
    assert list_sections(datalist) == ["training", "validation", "test"]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "dataset.json").write_text(datalist.read_text())
    entries = load_datalist(moved / "dataset.json", data_root=tmp_path, section="training")
    assert entries[0]["image"] == str(tmp_path / "imagesTr" / "a.nii.gz")
    with pytest.raises(FileNotFoundError):
        load_datalist(moved / "dataset.json", section="training")


def test_absolute_paths_kept(tmp_path, datalist):
    absolute = str(tmp_path / "imagesTr" / "a.nii.gz")
    (tmp_path / "abs.json").write_text(json.dumps({"training": [{"image": absolute}]}))
    assert load_datalist(tmp_path / "abs.json", data_root="/somewhere/else") == [{"image": absolute}]


# ------------------------------------------------------------------------------- bad input
def test_missing_file_names_entry_key_and_path(datalist, tmp_path):
    (tmp_path / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"dataset\.json: training\[1\] label: file not found: .*labelsTr/b\.nii\.gz"):
        load_datalist(datalist, section="training")
    entries = load_datalist(datalist, section="training", check_files=False)
    assert entries[1]["label"] == str(tmp_path / "labelsTr" / "b.nii.gz")


def test_missing_section_lists_available(datalist):
    with pytest.raises(ValueError,
                       match=r"no section 'testing'; available sections: \['training', 'validation', 'test'\]"):
        load_datalist(datalist, section="testing")


def test_malformed_documents_named(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_datalist(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON object"):
        list_sections(tmp_path / "list.json")
    (tmp_path / "noimage.json").write_text(json.dumps({"training": [{"label": 1}]}))
    with pytest.raises(ValueError, match=r"noimage\.json: training\[0\]: entry has no 'image' key"):
        load_datalist(tmp_path / "noimage.json")
    (tmp_path / "number.json").write_text(json.dumps({"training": [3]}))
    with pytest.raises(ValueError, match=r"number\.json: training\[0\]: an entry must be"):
        load_datalist(tmp_path / "number.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_datalist(tmp_path / "missing.json")
