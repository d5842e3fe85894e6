"""RoI heads stage: box branch (pool -> box head -> predictor -> decode -> per-class NMS) and mask branch.

The box branch is split into separately callable steps so that other heads can reuse it:

- :meth:`RoIHeads.box_outputs`: proposals -> class logits FloatTensor[R, K] and deltas FloatTensor[R, 4K];
- :meth:`RoIHeads.candidates`: one row per (proposal, foreground class) with its softmax score, label,
  decoded and clipped box and raw deltas;
- :meth:`RoIHeads.select`: score filter, small-box removal, per-class NMS and the top-n, as indices
  into the candidates.

For example, the ranked rows ``[score, dx, dy, dw, dh]`` of one image after per-class NMS with the
score filter off are ``c = candidates[i]; keep = select(c, score_thresh=-1, ...)`` and
``torch.cat([c["scores"][keep, None], c["deltas"][keep]], 1)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, remove_small_boxes

from .box_coder import BoxCoder
from .matching import BELOW_LOW, BETWEEN, Matcher, sample_balanced
from .roi_losses import fastrcnn_loss, mask_loss, mask_targets

MIN_DETECTION_SIZE = 1e-2


class RoIHeads(nn.Module):
    """Classify and refine proposals; predict a mask for each detection.

    Args:
        box_roi_pool, box_head, box_predictor: the box branch.
        mask_roi_pool, mask_head, mask_predictor: the mask branch, or all None for boxes only.
        fg_iou_thresh / bg_iou_thresh: proposal matching (>= fg positive, < bg background).
        batch_size_per_image / positive_fraction: RoIs sampled per image in training.
        bbox_reg_weights: weights of the box coder.
        score_thresh: detections need a score above this.
        nms_thresh: IoU threshold of the per-class NMS.
        detections_per_img: detections kept per image.
        mask_overlap_thresh: after the masks are pasted, a detection with more than this fraction of
            its mask inside a better detection's mask is dropped (:mod:`.mask_overlap`); 1 keeps all.
    """

    def __init__(self, *, box_roi_pool: MultiScaleRoIAlign, box_head: nn.Module, box_predictor: nn.Module,
                 mask_roi_pool: MultiScaleRoIAlign | None, mask_head: nn.Module | None,
                 mask_predictor: nn.Module | None,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 bbox_reg_weights: tuple[float, float, float, float], score_thresh: float, nms_thresh: float,
                 detections_per_img: int, mask_overlap_thresh: float = 1.0) -> None:
        super().__init__()
        self.box_roi_pool, self.box_head, self.box_predictor = box_roi_pool, box_head, box_predictor
        self.mask_roi_pool, self.mask_head, self.mask_predictor = mask_roi_pool, mask_head, mask_predictor
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality=False)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.mask_overlap_thresh = mask_overlap_thresh
        # (positive, sampled) RoIs of the last training batch, summed over its images (a diagnostic).
        self.last_sampling: tuple[int, int] | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    @property
    def poolers(self) -> list[MultiScaleRoIAlign]:
        """The box pooler and, with a mask branch, the mask pooler."""
        return [p for p in (self.box_roi_pool, self.mask_roi_pool) if p is not None]

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict] | None = None) -> tuple[list[dict], dict]:
        """Detections (eval: list of dicts with boxes, scores, labels, masks) or losses (training).

        Eval masks are probabilities FloatTensor[N, 1, M, M] of each detection's own class.
        """
        if self.training:
            return [], self.losses(features, proposals, image_sizes, targets)
        detections = self.detect(features, proposals, image_sizes)
        if self.has_mask:
            self.add_masks(features, detections, image_sizes)
        return detections, {}

    def box_outputs(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                    image_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoIAlign + box head + predictor: logits FloatTensor[R, K], deltas FloatTensor[R, 4K] (R over all images)."""
        pooled = self.box_roi_pool(features, proposals, image_sizes)  # (R, C, S, S)
        return self.box_predictor(self.box_head(pooled))

    def candidates(self, class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: list[torch.Tensor],
                   image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Every (proposal, foreground class) pair of every image, in proposal-major order.

        Returns:
            Per image a dict with ``scores`` FloatTensor[P*(K-1)] (softmax over all K classes),
            ``labels`` Int64Tensor[P*(K-1)] in 1..K-1, ``boxes`` FloatTensor[P*(K-1), 4] (decoded,
            clipped) and ``deltas`` FloatTensor[P*(K-1), 4] (raw regression output).
        """
        num_classes = class_logits.shape[-1]
        boxes = self.box_coder.decode(box_deltas, torch.cat(proposals))  # (R, K, 4)
        scores = F.softmax(class_logits, dim=-1)
        deltas = box_deltas.reshape(box_deltas.shape[0], num_classes, 4)  # (R, K, 4)
        counts = [p.shape[0] for p in proposals]
        out = []
        for b, s, d, size in zip(boxes.split(counts), scores.split(counts), deltas.split(counts), image_sizes):
            labels = torch.arange(num_classes, device=s.device).expand_as(s)
            out.append({"boxes": clip_boxes_to_image(b, size)[:, 1:].reshape(-1, 4), "scores": s[:, 1:].reshape(-1),
                        "labels": labels[:, 1:].reshape(-1), "deltas": d[:, 1:].reshape(-1, 4)})
        return out

    @staticmethod
    def select(candidates: dict[str, torch.Tensor], *, score_thresh: float, nms_thresh: float,
               max_detections: int) -> torch.Tensor:
        """Indices of the kept candidates, best score first: score > thresh, not tiny, per-class NMS, top-n."""
        keep = torch.where(candidates["scores"] > score_thresh)[0]
        keep = keep[remove_small_boxes(candidates["boxes"][keep], MIN_DETECTION_SIZE)]
        order = batched_nms(candidates["boxes"][keep], candidates["scores"][keep], candidates["labels"][keep],
                            nms_thresh)
        return keep[order[:max_detections]]

    def detect(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Final boxes, scores and labels per image (thresholds of this module)."""
        logits, deltas = self.box_outputs(features, proposals, image_sizes)
        detections = []
        for cand in self.candidates(logits, deltas, proposals, image_sizes):
            keep = self.select(cand, score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                               max_detections=self.detections_per_img)
            detections.append({"boxes": cand["boxes"][keep], "scores": cand["scores"][keep],
                               "labels": cand["labels"][keep]})
        return detections

    def add_masks(self, features: dict[str, torch.Tensor], detections: list[dict], image_sizes) -> None:
        """Set ``masks`` (FloatTensor[N, 1, M, M] probabilities of the detected class) in each detection."""
        boxes = [d["boxes"] for d in detections]
        if sum(b.shape[0] for b in boxes) == 0:
            size = 2 * self.mask_roi_pool.output_size[0]
            for d in detections:
                d["masks"] = d["boxes"].new_zeros((0, 1, size, size))
            return
        hidden = self.mask_head(self.mask_roi_pool(features, boxes, image_sizes))
        labels = torch.cat([d["labels"] for d in detections])
        probs = self.mask_predictor.forward_for_labels(hidden, labels).sigmoid()
        for d, p in zip(detections, probs.split([b.shape[0] for b in boxes])):
            d["masks"] = p

    def sample_rois(self, proposals: list[torch.Tensor], targets: list[dict]) -> tuple[list[torch.Tensor], ...]:
        """Add the ground-truth boxes to the proposals, label them and draw a balanced sample per image.

        Returns:
            Per image: sampled RoIs FloatTensor[S, 4], labels Int64Tensor[S] (0 background),
            matched ground-truth indices Int64Tensor[S] and regression targets FloatTensor[S, 4].
        """
        rois, labels, matched, reg_targets = [], [], [], []
        num_pos = num_sampled = 0
        for props, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(props.dtype)
            props = torch.cat([props, gt_boxes])
            lab, idx = self._label_rois(props, gt_boxes, target["labels"])
            pos, neg = sample_balanced(lab, batch_size=self.batch_size_per_image,
                                       positive_fraction=self.positive_fraction)
            chosen = torch.sort(torch.cat([pos, neg])).values
            num_pos, num_sampled = num_pos + pos.numel(), num_sampled + chosen.numel()
            gt_for_rows = gt_boxes[idx[chosen]] if gt_boxes.numel() else torch.zeros_like(props[chosen])
            rois.append(props[chosen])
            labels.append(lab[chosen])
            matched.append(idx[chosen])
            reg_targets.append(self.box_coder.encode(gt_for_rows, props[chosen]))
        self.last_sampling = (num_pos, num_sampled)
        return rois, labels, matched, reg_targets

    def _label_rois(self, rois: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor):
        if gt_boxes.numel() == 0:
            zeros = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
            return zeros, zeros.clone()
        matches = self.matcher(gt_boxes, rois)
        idx = matches.clamp(min=0)
        labels = gt_labels[idx].to(torch.int64)
        labels[matches == BELOW_LOW] = 0
        labels[matches == BETWEEN] = -1
        return labels, idx

    def losses(self, features, proposals, image_sizes, targets) -> dict[str, torch.Tensor]:
        """Box losses on a balanced RoI sample, and the mask loss on its positive RoIs."""
        if targets is None:
            raise ValueError("the RoI heads need targets in training mode")
        rois, labels, matched, reg_targets = self.sample_rois(proposals, targets)
        logits, deltas = self.box_outputs(features, rois, image_sizes)
        loss_cls, loss_box = fastrcnn_loss(logits, deltas, torch.cat(labels), torch.cat(reg_targets))
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.has_mask:
            losses["loss_mask"] = self._mask_loss(features, rois, labels, matched, targets, image_sizes)
        return losses

    def _mask_loss(self, features, rois, labels, matched, targets, image_sizes) -> torch.Tensor:
        positive = [torch.where(lab > 0)[0] for lab in labels]
        pos_rois = [r[p] for r, p in zip(rois, positive)]
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, pos_rois, image_sizes)))
        size = logits.shape[-1]
        mask_tg = [mask_targets(t["masks"], r, m[p], size) for t, r, m, p in zip(targets, pos_rois, matched, positive)]
        return mask_loss(logits, torch.cat([lab[p] for lab, p in zip(labels, positive)]), torch.cat(mask_tg))
