"""mean_average_precision against pycocotools' COCOeval (coco style), against a direct loop and hand
counts (per_image style), and its input checks."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.mean_ap import COCO_IOU_THRESHOLDS, mean_average_precision
from utils.rle import box_iou_coco, mask_iou_coco

# --------------------------------------------------------------------------- random cases

def _ellipse(rng, h, w):
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(1, h / 3), rng.uniform(1, w / 3)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _mask_box(mask):
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 1.0, 1.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _jitter(rng, mask):
    """A prediction near a GT mask: shifted, sometimes eroded or grown."""
    out = np.roll(mask, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    if rng.random() < 0.3:
        out = out | np.roll(out, 1, axis=int(rng.integers(2)))
    return out


def _random_image(rng, h, w, *, n_classes, crowd):
    m = int(rng.choice([0, 0, 1, 2, 3, 4]))
    gt = [_ellipse(rng, h, w) for _ in range(m)]
    gt_labels = rng.integers(1, n_classes + 1, m)
    iscrowd = (rng.random(m) < 0.2) if crowd else np.zeros(m, dtype=bool)
    preds, labels = [], []
    for g, lab in zip(gt, gt_labels):
        for _ in range(int(rng.choice([0, 1, 1, 2]))):  # missed, found, found twice (duplicate)
            preds.append(_jitter(rng, g))
            labels.append(lab if rng.random() < 0.85 else rng.integers(1, n_classes + 1))
    for _ in range(int(rng.integers(0, 3))):  # false positives
        preds.append(_ellipse(rng, h, w))
        labels.append(rng.integers(1, n_classes + 1))
    if rng.random() < 0.15:
        preds, labels = [], []
    n = len(preds)
    scores = np.round(rng.random(n), 1) if rng.random() < 0.5 else rng.random(n)  # rounding makes ties
    probs = [np.where(p, rng.uniform(0.51, 1, (h, w)), rng.uniform(0, 0.5, (h, w))) for p in preds]
    boxes = [np.array(_mask_box(p)) + rng.normal(0, 1.5, 4) for p in preds]
    boxes = [np.r_[np.minimum(b[:2], b[2:]), np.maximum(b[:2], b[2:])] for b in boxes]
    return {
        "boxes": torch.tensor(np.array(boxes).reshape(n, 4), dtype=torch.float32),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(np.array(labels, dtype=np.int64).reshape(n)),
        "masks": torch.tensor(np.array(probs).reshape(n, 1, h, w), dtype=torch.float32),
    }, {
        "boxes": torch.tensor(np.array([_mask_box(g) for g in gt]).reshape(m, 4), dtype=torch.float32),
        "labels": torch.tensor(gt_labels, dtype=torch.int64),
        "masks": torch.tensor(np.array(gt).reshape(m, h, w), dtype=torch.uint8),
        "iscrowd": torch.tensor(iscrowd.astype(np.int64)),
    }


def _random_dataset(seed, *, crowd=False):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
    n_classes = int(rng.integers(1, 4))
    cases = [_random_image(rng, h, w, n_classes=n_classes, crowd=crowd) for _ in range(int(rng.integers(1, 7)))]
    return [c[0] for c in cases], [c[1] for c in cases]


# --------------------------------------------------------------------------- pycocotools reference

def _xywh(box):
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _rle(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)[:, :, None]))[0]


def _coco_eval(predictions, targets, iou_type, max_det=100):
    """COCOeval on COCO dicts built from the same tensors; returns it after accumulate/summarize."""
    labels = sorted({int(v) for d in predictions + targets for v in d["labels"]} | {1})
    images = [{"id": i + 1, "height": 1, "width": 1} for i in range(len(targets))]
    anns, dets = [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        for j in range(len(t["labels"])):
            seg = _rle(t["masks"][j].numpy())
            box = _xywh(t["boxes"][j])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(t["labels"][j]),
                         "iscrowd": int(t["iscrowd"][j]), "segmentation": seg, "bbox": box,
                         "area": float(mask_utils.area(seg)) if iou_type == "segm" else box[2] * box[3]})
        for j in range(len(p["labels"])):
            det = {"image_id": i + 1, "category_id": int(p["labels"][j]), "score": float(p["scores"][j])}
            if iou_type == "segm":
                det["segmentation"] = _rle(p["masks"][j, 0].numpy() > 0.5)
            else:
                det["bbox"] = _xywh(p["boxes"][j])
            dets.append(det)
    gt = COCO()
    gt.dataset = {"images": images, "categories": [{"id": c} for c in labels], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if dets:
            dt = gt.loadRes(dets)
        else:
            dt = COCO()
            dt.dataset = {"images": images, "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        ev.params.maxDets = [min(1, max_det), min(10, max_det), max_det]  # evaluate() sorts them
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _assert_matches_cocoeval(ours, ev):
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K], area "all", maxDets[-1]
    stats = ev.stats[:3].copy()
    if ev.params.maxDets[-1] != 100:  # summarize() reads mAP at maxDets=100 only: average it here
        stats[0] = precision[precision > -1].mean() if (precision > -1).any() else -1
    for ours_value, ref in zip((ours["mAP"], ours["AP50"], ours["AP75"]), stats):
        np.testing.assert_allclose(ours_value, np.nan if ref == -1 else ref, atol=1e-6)
    for t in range(precision.shape[0]):
        valid = precision[t][precision[t] > -1]
        np.testing.assert_allclose(ours["AP"][t], valid.mean() if valid.size else np.nan, atol=1e-6)
    for k, cat in enumerate(ev.params.catIds):
        ref = precision[:, :, k].mean(axis=1)
        ref = np.where(ref < 0, np.nan, ref)
        got = ours["per_class"].get(cat, {"AP": [np.nan] * len(ref)})["AP"]
        np.testing.assert_allclose(got, ref, atol=1e-6, err_msg=f"class {cat}")


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_coco_style_matches_cocoeval_on_random_datasets(iou_type):
    for seed in range(30):
        preds, targets = _random_dataset(seed)
        ours = mean_average_precision(preds, targets, iou_type=iou_type)
        _assert_matches_cocoeval(ours, _coco_eval(preds, targets, iou_type))


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_coco_style_matches_cocoeval_with_crowd_gt(iou_type):
    for seed in range(100, 115):
        preds, targets = _random_dataset(seed, crowd=True)
        ours = mean_average_precision(preds, targets, iou_type=iou_type)
        _assert_matches_cocoeval(ours, _coco_eval(preds, targets, iou_type))


@pytest.mark.parametrize("max_det", [1, 2])
def test_coco_style_matches_cocoeval_with_few_max_detections(max_det):
    for seed in range(200, 210):
        preds, targets = _random_dataset(seed)
        ours = mean_average_precision(preds, targets, iou_type="segm", max_detections=max_det)
        _assert_matches_cocoeval(ours, _coco_eval(preds, targets, "segm", max_det=max_det))


def test_coco_style_without_any_prediction_gives_zero():
    _, targets = _random_dataset(6)
    assert sum(len(t["labels"]) for t in targets) > 0
    preds = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 1, *t["masks"].shape[1:])} for t in targets]
    ours = mean_average_precision(preds, targets, iou_type="segm")
    _assert_matches_cocoeval(ours, _coco_eval(preds, targets, "segm"))
    assert ours["mAP"] == 0.0 and ours["num_images_without_predictions"] == len(targets)


def test_coco_style_without_any_gt_is_nan():
    preds, targets = _random_dataset(4)
    empty = [{k: v[:0] for k, v in t.items()} for t in targets]
    ours = mean_average_precision(preds, empty, iou_type="bbox")
    assert np.isnan(ours["mAP"]) and all(np.isnan(c["mAP"]) for c in ours["per_class"].values())


def test_box_iou_matches_pycocotools_including_crowd():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (7, 2))
    d = torch.tensor(np.c_[xy, xy + rng.uniform(0, 20, (7, 2))], dtype=torch.float32)
    g = d[:4] + torch.tensor(rng.normal(0, 3, (4, 4)), dtype=torch.float32)
    crowd = np.array([0, 1, 0, 1], dtype=bool)
    ref = mask_utils.iou([_xywh(b) for b in d], [_xywh(b) for b in g], crowd.astype(np.uint8).tolist())
    np.testing.assert_allclose(box_iou_coco(d, g, crowd=crowd), ref, atol=1e-12)


def test_identical_predictions_score_one_in_both_styles():
    _, targets = _random_dataset(7)
    preds = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"],
              "masks": t["masks"][:, None].float()} for t in targets]
    for style in ("coco", "per_image"):
        out = mean_average_precision(preds, targets, iou_type="segm", style=style)
        assert out["mAP"] == pytest.approx(1.0, abs=1e-9) or np.isnan(out["mAP"])


# --------------------------------------------------------------------------- per-image style

def _box(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2), float(y2)]


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def _gt(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def test_per_image_hand_computed():
    # image 0: GT A=[0,0,10,10], B=[20,0,30,10]; detections by score: hit A (IoU 1), miss, near B (IoU 0.6)
    #   at 0.5: TP, FP, TP -> precisions 1, 1/2, 2/3; interpolated 1, 2/3 -> AP = (1 + 2/3) / 2 = 5/6
    #   at 0.75: TP, FP, FP -> AP = 1/2
    # image 1: no GT, one detection -> 0.   image 2: no GT, no detection -> 1.   image 3: GT, no detection -> 0.
    near_b = _box(20, 0, 32, 10)  # IoU with B: 100 / 120 = 0.833 -> use a wider one for 0.6
    near_b = _box(20, 0, 30 + 20 / 3, 10)  # 100 / (100 + 66.7) = 0.6
    preds = [_det([_box(0, 0, 10, 10), _box(40, 40, 50, 50), near_b], [0.9, 0.8, 0.7], [1, 1, 1]),
             _det([_box(0, 0, 5, 5)], [0.5], [1]), _det([], [], []), _det([], [], [])]
    targets = [_gt([_box(0, 0, 10, 10), _box(20, 0, 30, 10)], [1, 1]), _gt([], []), _gt([], []),
               _gt([_box(0, 0, 4, 4)], [1])]
    out = mean_average_precision(preds, targets, iou_type="bbox", style="per_image", iou_thresholds=[0.5, 0.75])
    np.testing.assert_allclose(out["AP"], [(5 / 6 + 0 + 1 + 0) / 4, (1 / 2 + 0 + 1 + 0) / 4])
    # class 1 is present in images 0, 1 and 3 only: image 2 (neither) is left out of the class mean
    np.testing.assert_allclose(out["per_class"][1]["AP"], [(5 / 6 + 0 + 0) / 3, (1 / 2 + 0 + 0) / 3])
    assert out["per_class"][1]["num_images"] == 3
    assert out["num_images_without_gt"] == 2 and out["num_images_without_predictions"] == 2


def test_per_image_one_prediction_matches_one_gt():
    # One large detection covers two GT equally well; the original counted it twice (AP 1); here it is one
    # TP out of two GT (AP 1/2), and the second detection, lower score, takes the other GT (AP 1/2 + 1/2).
    targets = [_gt([_box(0, 0, 10, 10), _box(0, 0, 10, 10)], [1, 1])]
    one = mean_average_precision([_det([_box(0, 0, 10, 10)], [0.9], [1])], targets, iou_type="bbox",
                                 style="per_image", iou_thresholds=[0.5])
    two = mean_average_precision([_det([_box(0, 0, 10, 10)] * 2, [0.9, 0.8], [1, 1])], targets, iou_type="bbox",
                                 style="per_image", iou_thresholds=[0.5])
    assert one["AP"] == [0.5] and two["AP"] == [1.0]


def test_per_image_detection_of_wrong_label_is_a_false_positive():
    targets = [_gt([_box(0, 0, 10, 10)], [1])]
    preds = [_det([_box(0, 0, 10, 10), _box(0, 0, 10, 10)], [0.9, 0.8], [2, 1])]
    out = mean_average_precision(preds, targets, iou_type="bbox", style="per_image", iou_thresholds=[0.5])
    assert out["AP"] == [0.5]  # FP then TP: precision 1/2 at recall 1
    assert out["per_class"][1]["AP"] == [1.0] and out["per_class"][2]["AP"] == [0.0]


def _per_image_loop(preds, targets, thresholds):
    """Direct per-image loop over the documented rules (no crowd), on box IoU."""
    aps = np.zeros((len(preds), len(thresholds)))
    for i, (p, t) in enumerate(zip(preds, targets)):
        order = np.argsort(-p["scores"].double().numpy(), kind="stable")
        ious = box_iou_coco(p["boxes"], t["boxes"])
        g = len(t["labels"])
        for ti, thr in enumerate(thresholds):
            if g == 0:
                aps[i, ti] = float(len(order) == 0)
                continue
            taken, hits = set(), []
            for d in order:
                best, best_iou = None, thr
                for j in range(g):
                    if j in taken or int(t["labels"][j]) != int(p["labels"][d]) or ious[d, j] < best_iou:
                        continue
                    best, best_iou = j, ious[d, j]
                hits.append(best is not None)
                if best is not None:
                    taken.add(best)
            precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
            aps[i, ti] = sum(precision[k:].max() for k in range(len(hits)) if hits[k]) / g
    return aps.mean(axis=0)


def test_per_image_matches_direct_loop_on_random_datasets():
    for seed in range(20):
        preds, targets = _random_dataset(seed)
        out = mean_average_precision(preds, targets, iou_type="bbox", style="per_image")
        np.testing.assert_allclose(out["AP"], _per_image_loop(preds, targets, COCO_IOU_THRESHOLDS), atol=1e-12)


# --------------------------------------------------------------------------- contract and input checks

def test_result_keys_and_counts():
    preds, targets = _random_dataset(11)
    out = mean_average_precision(preds, targets, iou_type="segm")
    assert {"mAP", "AP50", "AP75", "AP", "per_class", "num_images", "num_gt", "num_predictions"} <= set(out)
    assert len(out["AP"]) == 10 and out["AP50"] == out["AP"][0] and out["AP75"] == out["AP"][5]
    assert out["num_gt"] == sum(len(t["labels"]) for t in targets)
    assert out["num_predictions"] == sum(len(p["labels"]) for p in preds)
    assert all(isinstance(k, int) for k in out["per_class"])


def test_binary_uint8_and_probability_masks_agree():
    preds, targets = _random_dataset(12)
    binary = [{**p, "masks": (p["masks"][:, 0] > 0.5).to(torch.uint8)} for p in preds]
    a = mean_average_precision(preds, targets, iou_type="segm")
    b = mean_average_precision(binary, targets, iou_type="segm")
    assert a["AP"] == b["AP"]


@pytest.mark.parametrize("kwargs, message", [
    ({"iou_type": "keypoints"}, "iou_type"), ({"style": "voc"}, "style"), ({"max_detections": 0}, "max_detections"),
    ({"iou_thresholds": [0.5, 1.5]}, "iou_thresholds"),
])
def test_bad_options_are_named(kwargs, message):
    preds, targets = _random_dataset(1)
    with pytest.raises(ValueError, match=message):
        mean_average_precision(preds, targets, **kwargs)


def test_bad_inputs_name_the_image():
    preds, targets = _random_dataset(2)
    with pytest.raises(ValueError, match="prediction dicts"):
        mean_average_precision(preds, targets[:-1])
    bad = [dict(p) for p in preds]
    del bad[0]["scores"]
    with pytest.raises(ValueError, match=r"predictions\[0\] lacks \['scores'\]"):
        mean_average_precision(bad, targets)
    bad = [dict(t) for t in targets]
    bad[-1]["labels"] = torch.zeros(len(bad[-1]["labels"]) + 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"targets\[{len(bad) - 1}\]: labels"):
        mean_average_precision(preds, bad)
    bad = [dict(p) for p in preds]
    bad[0]["masks"] = torch.zeros(len(bad[0]["labels"]), 1, 5, 5)
    targets[0]["masks"] = torch.ones(1, 6, 6, dtype=torch.uint8)
    targets[0].update(boxes=torch.zeros(1, 4), labels=torch.ones(1, dtype=torch.int64), iscrowd=torch.zeros(1))
    bad[0].update(boxes=torch.zeros(1, 4), scores=torch.ones(1), labels=torch.ones(1, dtype=torch.int64),
                  masks=torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="image 0: prediction masks are"):
        mean_average_precision(bad, targets)


def test_bad_boxes_and_crowd_flags_are_rejected():
    targets = [_gt([_box(0, 0, 10, 10)], [1])]
    with pytest.raises(ValueError, match=r"predictions\[0\]: boxes must be finite xyxy"):
        mean_average_precision([_det([_box(5, 0, 2, 10)], [0.9], [1])], targets, iou_type="bbox")
    with pytest.raises(ValueError, match=r"predictions\[0\]: boxes must be a FloatTensor\[N, 4\]"):
        mean_average_precision([{**_det([], [], []), "boxes": torch.zeros(3)}], targets, iou_type="bbox")
    with pytest.raises(ValueError, match=r"targets\[0\]: iscrowd has 2 entries for 1 boxes"):
        mean_average_precision([_det([], [], [])], [{**targets[0], "iscrowd": torch.zeros(2)}], iou_type="bbox")
    with pytest.raises(ValueError, match=r"predictions\[0\]: masks must have shape"):
        mean_average_precision([{**_det([_box(0, 0, 1, 1)], [0.9], [1]), "masks": torch.zeros(1, 2, 4, 4)}],
                               [{**targets[0], "masks": torch.zeros(1, 4, 4)}], iou_type="segm")


def test_non_finite_scores_are_rejected():
    preds, targets = _random_dataset(5)
    preds = [{**p, "scores": torch.full_like(p["scores"], float("nan"))} for p in preds]
    if any(len(p["scores"]) for p in preds):
        with pytest.raises(ValueError, match="scores must be finite"):
            mean_average_precision(preds, targets, iou_type="bbox")


def test_mask_iou_cpu_crops_and_window_product_equal_pycocotools():
    from utils.rle import _intersections_in_window, _iou_from_counts
    checked = 0
    for seed in range(300, 310):
        preds, targets = _random_dataset(seed, crowd=True)
        for p, t in zip(preds, targets):
            if not len(p["labels"]) or not len(t["labels"]):
                continue
            crowd = t["iscrowd"].numpy().astype(bool)
            ref = np.asarray(mask_utils.iou([_rle(m.numpy() > 0.5) for m in p["masks"][:, 0]],
                                            [_rle(m.numpy()) for m in t["masks"]], crowd.astype(np.uint8).tolist()))
            np.testing.assert_array_equal(mask_iou_coco(p["masks"][:, 0], t["masks"], crowd=crowd), ref)
            inter, area_p, area_g = _intersections_in_window(p["masks"][:, 0], t["masks"], 0.5)
            np.testing.assert_array_equal(_iou_from_counts(inter, area_p[:, None], area_g[None, :], crowd), ref)
            checked += 1
    assert checked > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_give_the_cpu_result():
    preds, targets = _random_dataset(21, crowd=True)
    def on_gpu(dicts):
        return [{k: v.cuda() for k, v in d.items()} for d in dicts]

    cpu = mean_average_precision(preds, targets, iou_type="segm")
    gpu = mean_average_precision(on_gpu(preds), on_gpu(targets), iou_type="segm")
    np.testing.assert_equal(gpu, cpu)  # NaN-aware, recursive
