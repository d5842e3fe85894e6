"""Region proposal stage: objectness and box deltas for every anchor, then the best proposals.

Per image and level the top ``pre_nms_top_n`` anchors by objectness are decoded (only those), clipped
to the image, stripped of tiny boxes, and suppressed with NMS per level; the best
``post_nms_top_n`` survive. In training, anchors are matched to the ground truth (IoU >= fg_iou is
positive, < bg_iou negative, plus each object's best anchors) and a balanced sample gives the
objectness (binary cross-entropy) and box (smooth L1) losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, batched_nms, clip_boxes_to_image, remove_small_boxes

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .matching import BELOW_LOW, BETWEEN, Matcher, sample_balanced
from .transform import ImageBatch

MIN_PROPOSAL_SIZE = 1e-3


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then 1x1 convs for objectness and box deltas, applied to every level.

    Args:
        in_channels: channels of the feature maps.
        num_anchors: anchors per position.
    """

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=None))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: objectness FloatTensor[B, A, H, W] and deltas FloatTensor[B, 4A, H, W]."""
        hidden = [self.conv(f) for f in features]
        return [self.cls_logits(h) for h in hidden], [self.bbox_pred(h) for h in hidden]


def flatten_predictions(objectness: list[torch.Tensor],
                        deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate levels in anchor order (y, x, anchor): FloatTensor[B, N] and FloatTensor[B, N, 4]."""
    flat_obj, flat_deltas = [], []
    for obj, delta in zip(objectness, deltas):
        b, a, h, w = obj.shape
        flat_obj.append(obj.permute(0, 2, 3, 1).reshape(b, -1))  # (B, H * W * A)
        flat_deltas.append(delta.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))  # (B, H * W * A, 4)
    return torch.cat(flat_obj, dim=1), torch.cat(flat_deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """Proposals from anchors; losses in training.

    Args:
        anchor_generator: :class:`AnchorGenerator`.
        head: :class:`RPNHead`.
        fg_iou_thresh / bg_iou_thresh: anchor matching thresholds.
        batch_size_per_image / positive_fraction: anchors sampled for the loss.
        pre_nms_top_n / post_nms_top_n: {"training": n, "testing": n}.
        nms_thresh: IoU threshold of the proposal NMS.
        score_thresh: proposals with a lower objectness probability are dropped.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, *, fg_iou_thresh: float, bg_iou_thresh: float,
                 batch_size_per_image: int, positive_fraction: float, pre_nms_top_n: dict[str, int],
                 post_nms_top_n: dict[str, int], nms_thresh: float, score_thresh: float = 0.0) -> None:
        super().__init__()
        self.anchor_generator, self.head = anchor_generator, head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality=True)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self._pre_nms_top_n, self._post_nms_top_n = dict(pre_nms_top_n), dict(post_nms_top_n)
        self.nms_thresh, self.score_thresh = nms_thresh, score_thresh
        # (positive, sampled) anchors of the last training batch, summed over its images (a diagnostic).
        self.last_sampling: tuple[int, int] | None = None

    def _top_n(self, which: dict[str, int]) -> int:
        return which["training" if self.training else "testing"]

    def forward(self, images: ImageBatch, features: dict[str, torch.Tensor],
                targets: list[dict] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Proposals (FloatTensor[P_i, 4] xyxy per image) and, in training, the RPN losses."""
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(tuple(images.tensors.shape[-2:]), maps)
        per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness, deltas = flatten_predictions(objectness, deltas)
        proposals = self.select_proposals(anchors, objectness.detach(), deltas.detach(), images.image_sizes, per_level)
        losses = self.loss(anchors, objectness, deltas, targets) if self.training else {}
        return proposals, losses

    def select_proposals(self, anchors: torch.Tensor, objectness: torch.Tensor, deltas: torch.Tensor,
                         image_sizes: list[tuple[int, int]], per_level: list[int]) -> list[torch.Tensor]:
        """Top anchors per level, decoded, clipped, filtered and suppressed per level (see module doc).

        Args:
            anchors: FloatTensor[N, 4]; objectness: FloatTensor[B, N]; deltas: FloatTensor[B, N, 4].
            image_sizes: (h, w) per image; per_level: anchors per level (summing to N).
        """
        index, levels = self._top_per_level(objectness, per_level)  # (B, K) each
        batch = torch.arange(objectness.shape[0], device=objectness.device)[:, None]
        scores = torch.sigmoid(objectness[batch, index])
        boxes = self.box_coder.decode(deltas[batch, index].reshape(-1, 4), anchors[index.reshape(-1)])
        boxes = boxes.view(objectness.shape[0], -1, 4)
        return [self._suppress(*args) for args in zip(boxes, scores, levels, image_sizes)]

    def _top_per_level(self, objectness: torch.Tensor, per_level: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, levels, offset = [], [], 0
        for level, obj in enumerate(objectness.split(per_level, dim=1)):
            top = obj.topk(min(self._top_n(self._pre_nms_top_n), obj.shape[1]), dim=1).indices
            index.append(top + offset)
            levels.append(torch.full_like(top, level))
            offset += obj.shape[1]
        return torch.cat(index, dim=1), torch.cat(levels, dim=1)

    def _suppress(self, boxes, scores, levels, image_size) -> torch.Tensor:
        boxes = clip_boxes_to_image(boxes, image_size)
        keep = remove_small_boxes(boxes, MIN_PROPOSAL_SIZE)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = torch.where(scores >= self.score_thresh)[0]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes, scores, levels, self.nms_thresh)[: self._top_n(self._post_nms_top_n)]
        return boxes[keep]

    def loss(self, anchors: torch.Tensor, objectness: torch.Tensor, deltas: torch.Tensor,
             targets: list[dict] | None) -> dict[str, torch.Tensor]:
        """Objectness and box-regression losses over a balanced sample of anchors per image."""
        if targets is None:
            raise ValueError("the RPN needs targets in training mode")
        num_anchors = anchors.shape[0]
        pos_rows, neg_rows, box_targets = [], [], []
        for i, target in enumerate(targets):
            labels, matched = self._label_anchors(anchors, target["boxes"])
            pos, neg = sample_balanced(labels, batch_size=self.batch_size_per_image,
                                       positive_fraction=self.positive_fraction)
            pos_rows.append(pos + i * num_anchors)
            neg_rows.append(neg + i * num_anchors)
            box_targets.append(self.box_coder.encode(matched[pos], anchors[pos]))
        pos, neg = torch.cat(pos_rows), torch.cat(neg_rows)
        sampled = torch.cat([pos, neg])
        self.last_sampling = (pos.numel(), sampled.numel())
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(objectness.dtype)
        box_loss = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos], torch.cat(box_targets), beta=1 / 9,
                                    reduction="sum") / max(sampled.numel(), 1)
        obj_loss = F.binary_cross_entropy_with_logits(objectness.reshape(-1)[sampled], labels)
        return {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}

    def _label_anchors(self, anchors: torch.Tensor, gt_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per anchor: 1 positive, 0 negative, -1 ignored; and the matched ground-truth box."""
        if gt_boxes.numel() == 0:
            return torch.zeros(anchors.shape[0], device=anchors.device), torch.zeros_like(anchors)
        matches = self.matcher(gt_boxes, anchors)
        labels = (matches >= 0).to(torch.float32)
        labels[matches == BELOW_LOW] = 0.0
        labels[matches == BETWEEN] = -1.0
        return labels, gt_boxes[matches.clamp(min=0)]
