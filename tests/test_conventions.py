"""The data conventions of docs/ARCHITECTURE.md, defined once in datasets.conventions."""
import numpy as np
import pytest

from datasets.conventions import (
    LUNG_WINDOW,
    MASK_TYPE_LABELS,
    class_names_for,
    hu_to_png,
    num_detection_classes,
    parse_slice_name,
)


@pytest.mark.parametrize("name, label", [("NCP_96_1328_0032.png", 2), ("2_96_1328_0032.png", 2),
                                         ("CP_7_1_0001.jpg", 1), ("Normal_3_4_0100.png", 0),
                                         ("0_3_4_0100.png", 0)])
def test_parse_slice_name(name, label):
    parsed = parse_slice_name(name)
    assert parsed.label == label
    assert (parsed.patient, parsed.scan) == tuple(name.split("_")[1:3])


@pytest.mark.parametrize("name", ["COVID_1_2_3.png", "NCP_1_2.png", "NCP_1_2_3_4.png", "slice.png"])
def test_bad_slice_name_is_named_in_error(name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        parse_slice_name(name)


def test_labels_come_from_mask_values():
    assert MASK_TYPE_LABELS["both"] == {2: 1, 3: 2}
    assert MASK_TYPE_LABELS["merge"] == {2: 1, 3: 1}
    assert MASK_TYPE_LABELS["ggo"] == {2: 1}
    assert [num_detection_classes(t) for t in ("both", "ggo", "merge")] == [3, 2, 2]
    with pytest.raises(ValueError, match="mask_type must be one of"):
        class_names_for("lesions")


def test_hu_to_png_lung_window():
    out = hu_to_png(np.array([-2000.0, -1350.0, -600.0, 150.0, 1000.0]))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]
    assert LUNG_WINDOW == (-1350.0, 150.0)  # centre -600, width 1500
    with pytest.raises(ValueError, match="window"):
        hu_to_png(np.zeros(3), window=(100, -100))
