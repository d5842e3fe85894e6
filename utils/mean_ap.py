"""Average precision of lesion detections (boxes or masks) over IoU thresholds 0.50:0.05:0.95.

Two styles, chosen with ``style``:

``"coco"``: dataset-level COCO AP, equal to pycocotools' ``COCOeval`` (area range "all",
``maxDets = max_detections``). Per class: each image's detections of that class are sorted by score
(stable, so ties keep their input order) and cut to ``max_detections``; at each IoU threshold a
detection, in score order, matches the not-yet-matched ground truth (GT) with the highest IoU
>= threshold (ties go to the later GT), preferring non-crowd GT; crowd GT (``iscrowd``) can match
many detections, and those detections are ignored. All images' detections of the class are then
ranked by score and COCO's 101-point interpolated precision is averaged. A class with no non-crowd
GT has AP NaN (COCOeval's -1) and is left out of the means. Box IoU uses COCO's continuous
convention (``w = x2 - x1``, no +1); crowd IoU divides by the detection's area.

``"per_image"``: COVID-CT-Mask-Net's per-image AP, averaged over images, kept so results compare
with its published table. In each image the detections (all classes, top ``max_detections`` by
score) are matched as above, except a detection only matches GT of its own label; AP is the
all-point area under the interpolated precision/recall curve (VOC/Matterport style). Unlike the
original, a detection matches at most one GT, a match needs IoU >= threshold (the original used >),
and score ties keep their input order (stable sort). Image conventions, as in the original's
evaluation: an image with neither GT nor detections scores 1; an image with GT but no detection, or
detections but no GT, scores 0; every image counts in the overall mean. Per class, the mean is over the images
where that class has GT or a detection (images without the class carry no information about it).
Crowd GT behaves as in ``"coco"``: not counted as GT; detections matched to it are dropped.

Masks are binarised with ``mask > mask_threshold`` (predictions) and ``mask > 0`` (targets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from utils.rle import box_iou_coco, mask_iou_coco, to_numpy

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # bit-equal to pycocotools' Params.iouThrs
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # pycocotools' Params.recThrs
IOU_TYPES = ("segm", "bbox")
STYLES = ("coco", "per_image")


@dataclass
class _Image:
    """One image's detections and ground truth, reduced to what matching needs."""
    scores: np.ndarray  # Float64[N]
    labels: np.ndarray  # Int64[N]
    gt_labels: np.ndarray  # Int64[M]
    crowd: np.ndarray  # Bool[M]
    ious: np.ndarray  # Float64[N, M]


def mean_average_precision(predictions: Sequence[dict], targets: Sequence[dict], *, iou_type: str = "segm",
                           iou_thresholds: Sequence[float] | None = None, style: str = "coco",
                           max_detections: int = 100, mask_threshold: float = 0.5) -> dict:
    """AP@0.5, AP@0.75, mAP@[0.5:0.95] and AP at each IoU threshold, overall and per class.

    Args:
        predictions: one dict per image: ``boxes`` (FloatTensor[N, 4]) xyxy pixels, ``scores``
            (FloatTensor[N]), ``labels`` (Int64Tensor[N]), and for ``segm`` ``masks``
            (Float/UInt8/BoolTensor[N, 1, H, W] or [N, H, W]: probabilities or binary masks).
        targets: one dict per image: ``boxes`` (FloatTensor[M, 4]), ``labels`` (Int64Tensor[M]),
            for ``segm`` ``masks`` (UInt8/BoolTensor[M, H, W] or [M, 1, H, W], foreground > 0), optional
            ``iscrowd`` (Int/BoolTensor[M]). Tensors may be on any device; masks are compared there.
        iou_type: ``"segm"`` (mask IoU) or ``"bbox"`` (box IoU).
        iou_thresholds: Float[T] in [0, 1]; default COCO's 0.50:0.05:0.95 (:data:`COCO_IOU_THRESHOLDS`).
        style: ``"coco"`` or ``"per_image"`` (see the module docstring).
        max_detections: detections kept per image and class (``coco``) or per image (``per_image``).
        mask_threshold: a predicted mask pixel is foreground when its value is above this.

    Returns:
        ``mAP`` (mean over thresholds), ``AP50``, ``AP75`` (NaN when the threshold is not evaluated),
        ``AP`` (list, one per threshold), ``per_class`` ({label: the same keys plus ``num_gt``,
        ``num_crowd``, ``num_predictions``, ``num_images``}), the counts ``num_images``, ``num_gt``,
        ``num_crowd``, ``num_predictions``, ``num_images_without_gt``,
        ``num_images_without_predictions``, and the settings. Undefined values are NaN.

    Raises:
        ValueError: for an unknown option, mismatched list lengths, or a malformed image (named
            by its index, with what is wrong).
    """
    thresholds = _check_options(iou_type, iou_thresholds, style, max_detections, len(predictions), len(targets))
    images = [_prepare_image(p, t, index=i, iou_type=iou_type, mask_threshold=mask_threshold)
              for i, (p, t) in enumerate(zip(predictions, targets))]
    flat = _Flat.from_images(images)
    if style == "coco":
        per_class, n_images = _coco_ap(flat, thresholds, max_detections)
        overall = _nanmean_classes(per_class, thresholds.size)
    else:
        per_class, n_images, overall = _per_image_ap(flat, thresholds, max_detections)
    return _summary(flat, thresholds, per_class, n_images, overall, style=style, iou_type=iou_type,
                    max_detections=max_detections, mask_threshold=mask_threshold)


def _check_options(iou_type, iou_thresholds, style, max_detections, n_pred, n_target) -> np.ndarray:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not isinstance(max_detections, (int, np.integer)) or max_detections < 1:
        raise ValueError(f"max_detections must be a positive integer, got {max_detections!r}")
    if n_pred != n_target:
        raise ValueError(f"got {n_pred} prediction dicts but {n_target} target dicts; need one of each per image")
    thresholds = COCO_IOU_THRESHOLDS if iou_thresholds is None else np.asarray(iou_thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or thresholds.size == 0 or not np.all((thresholds >= 0) & (thresholds <= 1)):
        raise ValueError(f"iou_thresholds must be a non-empty 1-D list of values in [0, 1], got {iou_thresholds!r}")
    return thresholds


# --------------------------------------------------------------------------- inputs

def _prepare_image(pred: dict, target: dict, *, index: int, iou_type: str, mask_threshold: float) -> _Image:
    """Validate one image's dicts and compute its prediction x GT IoU matrix."""
    needed = ("boxes", "scores", "labels") + (("masks",) if iou_type == "segm" else ())
    p_boxes = _checked_boxes(pred, needed, f"predictions[{index}]")
    g_boxes = _checked_boxes(target, ("boxes", "labels") + needed[3:], f"targets[{index}]")
    scores = to_numpy(pred["scores"]).astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"predictions[{index}]: scores must be finite")
    crowd = _crowd(target, len(g_boxes), index)
    if iou_type == "bbox":
        ious = box_iou_coco(p_boxes, g_boxes, crowd=crowd)
    else:
        p_masks, g_masks = _masks(pred, f"predictions[{index}]"), _masks(target, f"targets[{index}]")
        if len(p_masks) and len(g_masks) and p_masks.shape[1:] != g_masks.shape[1:]:
            raise ValueError(f"image {index}: prediction masks are {tuple(p_masks.shape[1:])} but target masks "
                             f"are {tuple(g_masks.shape[1:])}")
        ious = mask_iou_coco(p_masks, g_masks.to(p_masks.device), crowd=crowd, mask_threshold=mask_threshold)
    return _Image(scores=scores, labels=to_numpy(pred["labels"]).astype(np.int64),
                  gt_labels=to_numpy(target["labels"]).astype(np.int64), crowd=crowd, ious=ious)


def _checked_boxes(d: dict, keys: tuple[str, ...], name: str) -> np.ndarray:
    """Float64[N, 4] boxes of a prediction/target dict, after checking its keys, lengths and boxes."""
    if not isinstance(d, dict):
        raise ValueError(f"{name} must be a dict, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{name} lacks {missing} (has {sorted(d)})")
    if not all(isinstance(d[k], torch.Tensor) for k in keys):
        raise ValueError(f"{name}: {', '.join(keys)} must be tensors")
    boxes = to_numpy(d["boxes"]).astype(np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: boxes must be a FloatTensor[N, 4], got shape {tuple(boxes.shape)}")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"{name}: boxes must be finite xyxy with x2 >= x1 and y2 >= y1")
    for k in keys[1:]:
        if d[k].ndim < 1 or d[k].shape[0] != len(boxes):
            raise ValueError(f"{name}: {k} must have {len(boxes)} rows like boxes, got shape {tuple(d[k].shape)}")
    return boxes


def _crowd(target: dict, m: int, index: int) -> np.ndarray:
    if "iscrowd" not in target or target["iscrowd"] is None:
        return np.zeros(m, dtype=bool)
    crowd = torch.as_tensor(target["iscrowd"]).detach().cpu().numpy().reshape(-1)
    if crowd.size != m:
        raise ValueError(f"targets[{index}]: iscrowd has {crowd.size} entries for {m} boxes")
    return crowd.astype(bool)


def _masks(d: dict, name: str) -> torch.Tensor:
    """[K, H, W] view of a [K, 1, H, W] or [K, H, W] mask tensor."""
    masks = d["masks"]
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"{name}: masks must have shape [N, 1, H, W] or [N, H, W], got {tuple(d['masks'].shape)}")
    return masks


# --------------------------------------------------------------------------- matching

@dataclass
class _Flat:
    """All images' detections and GT concatenated; IoU matrices flattened with per-image offsets."""
    d_img: np.ndarray  # Int64[D] image of each detection
    d_local: np.ndarray  # Int64[D] index inside its image
    d_label: np.ndarray  # Int64[D]
    d_score: np.ndarray  # Float64[D]
    g_img: np.ndarray  # Int64[G]
    g_local: np.ndarray  # Int64[G]
    g_label: np.ndarray  # Int64[G]
    g_crowd: np.ndarray  # Bool[G]
    iou: np.ndarray  # Float64[sum N_i * M_i]
    iou_offset: np.ndarray  # Int64[I] where image i's [N_i, M_i] matrix starts in ``iou``
    n_images: int

    @classmethod
    def from_images(cls, images: list[_Image]) -> "_Flat":
        n_det = np.array([im.scores.size for im in images], dtype=np.int64)
        n_gt = np.array([im.gt_labels.size for im in images], dtype=np.int64)
        sizes = n_det * n_gt
        def cat(arrays, dtype):
            return np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays] or [np.zeros(0, dtype)])

        return cls(d_img=np.repeat(np.arange(len(images)), n_det), d_local=_local_index(n_det),
                   d_label=cat([im.labels for im in images], np.int64),
                   d_score=cat([im.scores for im in images], np.float64),
                   g_img=np.repeat(np.arange(len(images)), n_gt), g_local=_local_index(n_gt),
                   g_label=cat([im.gt_labels for im in images], np.int64),
                   g_crowd=cat([im.crowd for im in images], bool), iou=cat([im.ious for im in images], np.float64),
                   iou_offset=np.cumsum(sizes) - sizes, n_images=len(images))

    def n_gt_per_image(self) -> np.ndarray:
        return np.bincount(self.g_img, minlength=self.n_images)

    def iou_at(self, det: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """IoU of detection ``det`` with GT ``gt`` (flat indices of the same image, any broadcastable shapes)."""
        img = self.d_img[det]
        return self.iou[self.iou_offset[img] + self.d_local[det] * self.n_gt_per_image()[img] + self.g_local[gt]]


def _local_index(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated."""
    starts = np.cumsum(counts) - counts
    return np.arange(counts.sum()) - np.repeat(starts, counts)


def _rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal consecutive keys."""
    idx = np.arange(keys.size)
    if keys.size == 0:
        return idx
    new_run = np.r_[True, keys[1:] != keys[:-1]]
    return idx - np.maximum.accumulate(np.where(new_run, idx, 0))


@dataclass
class _Groups:
    """Detections and GT grouped (by image and class, or by image), each group sorted for matching."""
    det: np.ndarray  # Int64[K] flat detection indices, by group then score (stable), cut to max_detections
    det_group: np.ndarray  # Int64[K]
    det_rank: np.ndarray  # Int64[K] position by score inside the group
    gt: np.ndarray  # Int64[P, Mmax] flat GT indices, non-crowd first (stable), -1 as padding
    crowd: np.ndarray  # Bool[P, Mmax]


def _group(flat: _Flat, *, by_class: bool, max_detections: int) -> _Groups:
    """Sort detections (score, stable) and GT (non-crowd first) inside groups, as COCOeval does."""
    labels = np.unique(np.concatenate([flat.d_label, flat.g_label]))
    d_key = flat.d_img * labels.size + np.searchsorted(labels, flat.d_label) if by_class else flat.d_img
    g_key = flat.g_img * labels.size + np.searchsorted(labels, flat.g_label) if by_class else flat.g_img
    d_order = np.lexsort((flat.d_local, -flat.d_score, d_key))
    d_rank = _rank_in_runs(d_key[d_order])
    keep = d_rank < max_detections
    d_order, d_rank = d_order[keep], d_rank[keep]
    g_order = np.lexsort((flat.g_local, flat.g_crowd, g_key))
    keys = np.union1d(d_key[d_order], g_key)
    g_group, g_rank = np.searchsorted(keys, g_key[g_order]), _rank_in_runs(g_key[g_order])
    width = int(g_rank.max()) + 1 if g_rank.size else 0
    gt = np.full((keys.size, width), -1, dtype=np.int64)
    gt[g_group, g_rank] = g_order
    return _Groups(det=d_order, det_group=np.searchsorted(keys, d_key[d_order]), det_rank=d_rank, gt=gt,
                   crowd=(gt >= 0) & flat.g_crowd[np.maximum(gt, 0)])


def _iou_rows(flat: _Flat, groups: _Groups, *, same_label: bool) -> np.ndarray:
    """Float64[K, Mmax]: IoU of each grouped detection with its group's GT; -inf for padding
    (and, when ``same_label``, for GT of another label), so such pairs never match."""
    gt = groups.gt[groups.det_group]  # [K, Mmax]
    det = np.broadcast_to(groups.det[:, None], gt.shape)
    valid = gt >= 0
    if same_label:
        valid &= flat.g_label[np.maximum(gt, 0)] == flat.d_label[det]
    rows = np.full(gt.shape, -np.inf)
    rows[valid] = flat.iou_at(det[valid], gt[valid])
    return rows


def _greedy_match(rows: np.ndarray, groups: _Groups, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's greedy matching, for all groups and thresholds at once, one score rank at a time.

    Args:
        rows: Float64[K, Mmax] from :func:`_iou_rows`.
        groups: the grouping the rows follow.
        thresholds: Float64[T].

    Returns:
        ``matched`` and ``ignored`` (matched to a crowd GT), Bool[K, T] each.
    """
    k_total, width = rows.shape
    t_count = thresholds.size
    matched = np.zeros((k_total, t_count), dtype=bool)
    ignored = np.zeros((k_total, t_count), dtype=bool)
    if k_total == 0 or width == 0:
        return matched, ignored
    thr = np.minimum(thresholds, 1 - 1e-10)[None, :, None]  # [1, T, 1], as COCOeval caps it
    taken = np.zeros((groups.gt.shape[0], t_count, width), dtype=bool)  # [P, T, Mmax]
    by_rank = np.argsort(groups.det_rank, kind="stable")
    bounds = np.searchsorted(groups.det_rank[by_rank], np.arange(groups.det_rank.max() + 2))
    for r in range(bounds.size - 1):
        k = by_rank[bounds[r]:bounds[r + 1]]  # the r-th detection of every group that has one
        g = groups.det_group[k]
        iou, crowd = rows[k][:, None, :], groups.crowd[g][:, None, :]  # [A, 1, Mmax]
        ok = (~taken[g] | crowd) & (iou >= thr)  # [A, T, Mmax]
        regular = ok & ~crowd
        candidates = np.where(regular.any(-1, keepdims=True), regular, ok)
        scores = np.where(candidates, iou, -np.inf)[..., ::-1]
        best = width - 1 - np.argmax(scores, axis=-1)  # [A, T]: the last GT among equal best IoUs
        a, t = np.nonzero(candidates.any(-1))
        m = best[a, t]
        taken[g[a], t, m] = True
        matched[k[a], t] = True
        ignored[k[a], t] = groups.crowd[g[a], m]
    return matched, ignored


# --------------------------------------------------------------------------- COCO style

def _coco_ap(flat: _Flat, thresholds: np.ndarray, max_detections: int) -> tuple[dict, dict]:
    """Per-class AP (Float64[T], NaN without GT) and the number of images each class was evaluated on."""
    groups = _group(flat, by_class=True, max_detections=max_detections)
    matched, ignored = _greedy_match(_iou_rows(flat, groups, same_label=False), groups, thresholds)
    det_label, det_img = flat.d_label[groups.det], flat.d_img[groups.det]
    per_class, n_images = {}, {}
    for c in np.unique(np.concatenate([flat.d_label, flat.g_label])):
        sel = det_label == c  # keeps the (image, score rank) order COCOeval concatenates in
        n_regular = int(np.count_nonzero((flat.g_label == c) & ~flat.g_crowd))
        per_class[int(c)] = _coco_class_ap(flat.d_score[groups.det[sel]], matched[sel], ignored[sel], n_regular)
        n_images[int(c)] = np.union1d(det_img[sel], flat.g_img[flat.g_label == c]).size
    return per_class, n_images


def _coco_class_ap(scores: np.ndarray, matched: np.ndarray, ignored: np.ndarray, n_regular: int) -> np.ndarray:
    """COCOeval.accumulate for one class: 101-point interpolated precision averaged, per threshold.

    Args:
        scores: Float64[K] detection scores, in (image, rank) order.
        matched, ignored: Bool[K, T].
        n_regular: number of non-crowd GT of the class.

    Returns:
        Float64[T] AP; NaN when ``n_regular`` is 0.
    """
    t_count = matched.shape[1]
    if n_regular == 0:
        return np.full(t_count, np.nan)
    order = np.argsort(-scores, kind="mergesort")
    tps = (matched & ~ignored)[order].T  # [T, K]
    fps = (~matched & ~ignored)[order].T
    tp_sum = np.cumsum(tps, axis=1).astype(np.float64)
    fp_sum = np.cumsum(fps, axis=1).astype(np.float64)
    recall = tp_sum / n_regular
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # monotone envelope
    sampled = np.zeros((t_count, COCO_RECALL_THRESHOLDS.size))
    for t in range(t_count):
        inds = np.searchsorted(recall[t], COCO_RECALL_THRESHOLDS, side="left")
        reached = inds < scores.size
        sampled[t, reached] = precision[t, inds[reached]]
    return sampled.mean(axis=1)


# --------------------------------------------------------------------------- per-image style

def _per_image_ap(flat: _Flat, thresholds: np.ndarray, max_detections: int) -> tuple[dict, dict, np.ndarray]:
    """Per-class mean of per-image AP, images per class, and the overall Float64[T] mean over all images."""
    groups = _group(flat, by_class=False, max_detections=max_detections)
    matched, ignored = _greedy_match(_iou_rows(flat, groups, same_label=True), groups, thresholds)
    det_img, det_label = flat.d_img[groups.det], flat.d_label[groups.det]
    regular = ~flat.g_crowd
    overall = _image_aps(det_img, matched, ignored, np.bincount(flat.g_img[regular], minlength=flat.n_images))
    per_class, n_images = {}, {}
    for c in np.unique(np.concatenate([flat.d_label, flat.g_label])):
        sel = det_label == c
        n_gt = np.bincount(flat.g_img[regular & (flat.g_label == c)], minlength=flat.n_images)
        aps = _image_aps(det_img[sel], matched[sel], ignored[sel], n_gt)
        present = (n_gt > 0) | (np.bincount(det_img[sel], minlength=flat.n_images) > 0)
        per_class[int(c)] = aps[present].mean(axis=0) if present.any() else np.full(thresholds.size, np.nan)
        n_images[int(c)] = int(present.sum())
    mean = overall.mean(axis=0) if flat.n_images else np.full(thresholds.size, np.nan)
    return per_class, n_images, mean


def _image_aps(det_img: np.ndarray, matched: np.ndarray, ignored: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    """All-point interpolated AP of every image at every threshold (Matterport/VOC style).

    Args:
        det_img: Int64[K] image of each detection, sorted by image then score rank.
        matched, ignored: Bool[K, T].
        n_gt: Int64[I] non-crowd GT per image.

    Returns:
        Float64[I, T]: sum over true positives of the interpolated precision, divided by the GT count;
        1 for an image with neither GT nor (non-ignored) detection, 0 when only one of them is empty.
    """
    counted = ~ignored
    tp = matched & counted
    starts = np.searchsorted(det_img, det_img)  # first row of each detection's image
    cum_tp, cum_n = _run_cumsum(tp, starts), _run_cumsum(counted, starts)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(counted, cum_tp / cum_n, -np.inf)
    envelope = _run_reverse_cummax(precision, _rank_in_runs(det_img))
    shape = (n_gt.size, matched.shape[1])
    tp_sum, n_counted = np.zeros(shape), np.zeros(shape)
    k, t = np.nonzero(tp)
    np.add.at(tp_sum, (det_img[k], t), envelope[k, t])
    k, t = np.nonzero(counted)
    np.add.at(n_counted, (det_img[k], t), 1)
    has_gt = n_gt[:, None] > 0
    return np.where(has_gt, tp_sum / np.maximum(n_gt, 1)[:, None], (n_counted == 0).astype(np.float64))


def _run_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sum along axis 0 restarting at each run; ``starts[k]`` is the first row of k's run."""
    total = np.cumsum(values, axis=0, dtype=np.float64)
    before = np.concatenate([np.zeros((1,) + values.shape[1:]), total])[starts]
    return total - before


def _run_reverse_cummax(values: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Maximum of each row and the rows after it in its run (runs are consecutive, ``rank`` 0, 1, ...)."""
    out = values.copy()
    has_next = np.r_[rank[1:] == rank[:-1] + 1, False] if rank.size else np.zeros(0, dtype=bool)
    for r in range(int(rank.max()) - 1 if rank.size else -1, -1, -1):
        k = np.flatnonzero(has_next & (rank == r))
        out[k] = np.maximum(out[k], out[k + 1])
    return out


# --------------------------------------------------------------------------- results

def _ap_entry(ap: np.ndarray, thresholds: np.ndarray) -> dict:
    """mAP, AP50, AP75 and the per-threshold list from Float64[T] (NaN where undefined)."""
    def at(value: float) -> float:
        hit = np.flatnonzero(np.isclose(thresholds, value, rtol=0, atol=1e-9))
        return float(ap[hit[0]]) if hit.size else float("nan")
    return {"mAP": float(ap.mean()) if ap.size else float("nan"), "AP50": at(0.5), "AP75": at(0.75),
            "AP": [float(v) for v in ap]}


def _nanmean_classes(per_class: dict, t_count: int) -> np.ndarray:
    """Mean over the classes with a defined AP (COCO leaves classes without GT out); NaN if none."""
    defined = [ap for ap in per_class.values() if not np.isnan(ap).any()]
    return np.mean(defined, axis=0) if defined else np.full(t_count, np.nan)


def _summary(flat: _Flat, thresholds: np.ndarray, per_class: dict, n_images: dict, overall: np.ndarray,
             **settings) -> dict:
    n_gt = flat.n_gt_per_image()
    n_det = np.bincount(flat.d_img, minlength=flat.n_images)
    classes = {}
    for c, ap in per_class.items():
        gt_c = flat.g_label == c
        classes[c] = {**_ap_entry(ap, thresholds), "num_gt": int(np.count_nonzero(gt_c & ~flat.g_crowd)),
                      "num_crowd": int(np.count_nonzero(gt_c & flat.g_crowd)),
                      "num_predictions": int(np.count_nonzero(flat.d_label == c)), "num_images": n_images[c]}
    return {**_ap_entry(overall, thresholds), "per_class": classes, "num_images": flat.n_images,
            "num_gt": int(np.count_nonzero(~flat.g_crowd)), "num_crowd": int(np.count_nonzero(flat.g_crowd)),
            "num_predictions": int(flat.d_score.size), "num_images_without_gt": int(np.count_nonzero(n_gt == 0)),
            "num_images_without_predictions": int(np.count_nonzero(n_det == 0)),
            "iou_thresholds": [float(t) for t in thresholds], **settings}
