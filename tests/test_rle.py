"""COCO RLE encoder/decoder against pycocotools.mask, byte for byte."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from utils.rle import counts_to_string, decode_rle, encode_masks, rle_area, string_to_counts


def _reference(masks: np.ndarray) -> list[dict]:
    """pycocotools' encoding of UInt8[N, H, W] (it wants Fortran-ordered [H, W, N])."""
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _random_masks(rng, kind: str) -> np.ndarray:
    n, h, w = int(rng.integers(1, 4)), int(rng.integers(1, 70)), int(rng.integers(1, 70))
    if kind == "empty":
        return np.zeros((n, h, w), np.uint8)
    if kind == "full":
        return np.ones((n, h, w), np.uint8)
    if kind == "pixel":
        masks = np.zeros((n, h, w), np.uint8)
        masks[:, rng.integers(h), rng.integers(w)] = 1
        return masks
    if kind == "blob":
        yy, xx = np.mgrid[:h, :w]
        return np.stack([((yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2
                          <= rng.uniform(1, 30) ** 2) for _ in range(n)]).astype(np.uint8)
    return (rng.random((n, h, w)) < rng.random()).astype(np.uint8)  # noise of random density


@pytest.mark.parametrize("kind", ["empty", "full", "pixel", "blob", "noise"])
def test_encode_matches_pycocotools_byte_for_byte(kind):
    rng = np.random.default_rng(len(kind))
    for _ in range(60):
        masks = _random_masks(rng, kind)
        ours, ref = encode_masks(masks), _reference(masks)
        assert [r["counts"] for r in ours] == [r["counts"].decode("ascii") for r in ref]
        assert [r["size"] for r in ours] == [list(r["size"]) for r in ref]


def test_long_runs_and_large_images():
    masks = np.zeros((3, 1100, 1300), np.uint8)
    masks[0, 0, 0] = 1  # first run empty
    masks[1, -1, -1] = 1  # one run of ~1.4M zeros
    masks[2, 300:900, 100:1200] = 1
    assert [r["counts"] for r in encode_masks(masks)] == [r["counts"].decode() for r in _reference(masks)]


def test_accepts_bool_tensors_and_nonbinary_values():
    rng = np.random.default_rng(1)
    masks = rng.random((2, 17, 23)) < 0.3
    values = masks.astype(np.uint8) * rng.integers(1, 255, masks.shape).astype(np.uint8)
    expected = [r["counts"].decode() for r in _reference(masks.astype(np.uint8))]
    assert [r["counts"] for r in encode_masks(torch.from_numpy(masks))] == expected
    assert [r["counts"] for r in encode_masks(values)] == expected  # non-zero is foreground


def test_decode_and_area_round_trip_against_pycocotools():
    rng = np.random.default_rng(2)
    for kind in ["empty", "full", "pixel", "blob", "noise"]:
        masks = _random_masks(rng, kind)
        for mask, ours, ref in zip(masks, encode_masks(masks), _reference(masks)):
            np.testing.assert_array_equal(decode_rle(ours), mask)
            np.testing.assert_array_equal(decode_rle(ours), mask_utils.decode(ref))
            assert rle_area(ours) == mask_utils.area(ref) == mask.sum()


def test_uncompressed_rle_and_string_counts_agree():
    rle = {"size": [3, 4], "counts": [2, 3, 1, 6]}  # column-major runs
    mask = decode_rle(rle)
    assert mask.T.reshape(-1).tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert encode_masks(mask[None])[0]["counts"] == counts_to_string([2, 3, 1, 6])
    np.testing.assert_array_equal(string_to_counts(counts_to_string([2, 3, 1, 6])), [2, 3, 1, 6])


def test_zero_size_mask():
    masks = np.zeros((1, 0, 5), np.uint8)
    assert encode_masks(masks)[0]["counts"] == _reference(masks)[0]["counts"].decode()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        encode_masks(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="sum to 5 pixels"):
        decode_rle({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match="outside"):
        decode_rle({"size": [2, 3], "counts": "!!"})
    with pytest.raises(ValueError, match="middle of a value"):
        string_to_counts("0P")
    with pytest.raises(ValueError, match="'size' and 'counts'"):
        rle_area({"counts": "0"})
