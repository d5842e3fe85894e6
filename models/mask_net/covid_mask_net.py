"""COVID-CT-Mask-Net: the segmentation model's detector read by a small classification module S.

``CovidMaskNet.forward`` reads like the paper: transform -> backbone (+FPN) -> RPN -> RoI box branch
-> B ranked detections per slice -> S -> 3 logits (Control, CP, COVID-19). The stages are those of
:class:`models.mask_net.MaskRCNN` built without the mask branch, so their parameter names are the
segmentation model's and its weights load by name.

What S reads: for each image the RoI heads' candidates (one per proposal and foreground class, with
its softmax score over all classes and its raw box-regression deltas) go through per-class NMS at
``box_nms_thresh`` with the score filter off; the best ``roi_batch_size`` = B survivors, by score,
become the rows of a Float[B, W] matrix. ``score_columns`` lays out a row:

- ``"shared"`` (the original's): ``[score, dx, dy, dw, dh]``, W = 5. The row does not say which class
  the score belongs to, so a consolidation and a ground-glass detection scored alike look the same.
- ``"per_class"`` (what ``train_classifier.py`` builds by default): one score column per foreground
  class, the detection's score in its own class's column and 0 in the others, then the deltas:
  ``[s_GGO, s_consolidation, dx, dy, dw, dh]`` for the two lesion classes, W = (K - 1) + 4. With one
  lesion class (K = 2) both layouts are the same.

When fewer than B survive, the rows are filled deterministically by **repeating the survivors in
score order**: slot j (0 <= j < B) holds survivor ``floor(j * n / B)``, so each of the n survivors
fills a contiguous run of B/n (rounded) slots, best first. This is the layout the original gave
with random run lengths, without the randomness. When no detection survives the matrix is all
zeros (S still answers). The detector always runs as at test time (proposal counts, no target
sampling) and its BatchNorm layers stay in eval mode, so their running statistics never change.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.checkpoint import CLASSIFIER_BUILDER, SEGMENTATION_BUILDER  # noqa: F401  (re-exported, the 2D builder ids)

from .mask_rcnn import MaskRCNN, maskrcnn_resnet_fpn

NUM_SLICE_CLASSES = 3  # Control, CP, COVID-19
ROW_WIDTH = 5  # score, dx, dy, dw, dh (the original's row)
N_DELTAS = 4
SCORE_COLUMNS = ("shared", "per_class")
SCORE_FILTER_OFF = -1.0  # softmax scores are >= 0, so every candidate passes
CLASSIFIER_DEFAULTS = {"box_nms_thresh": 0.75, "rpn_nms_thresh": 0.75}
# Builder options that the classifier fixes itself.
RESERVED_OPTIONS = ("with_masks", "box_score_thresh", "box_detections_per_img")
S_PREFIX = "s_module."
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ClassificationModuleS(nn.Sequential):
    """S: ``Linear(W*B -> F)`` -> ReLU -> ``Linear(F -> F)`` -> ReLU -> ``Linear(F -> 3)``.

    Args:
        roi_batch_size: B, the ranked detections per image.
        s_features: F, the hidden width.
        num_outputs: logits (3: Control, CP, COVID-19).
        row_width: W, the values per row (5 for the original's row; :func:`row_width`).
    """

    def __init__(self, *, roi_batch_size: int, s_features: int, num_outputs: int = NUM_SLICE_CLASSES,
                 row_width: int = ROW_WIDTH) -> None:
        super().__init__(nn.Linear(row_width * roi_batch_size, s_features), nn.ReLU(inplace=True),
                         nn.Linear(s_features, s_features), nn.ReLU(inplace=True),
                         nn.Linear(s_features, num_outputs))


def row_width(num_classes: int, score_columns: str) -> int:
    """W, the values of one row S reads: 5 (``"shared"``) or (num_classes - 1) + 4 (``"per_class"``)."""
    return ROW_WIDTH if score_columns == "shared" else num_classes - 1 + N_DELTAS


def fill_ranked_rows(rows: list[torch.Tensor], roi_batch_size: int) -> torch.Tensor:
    """Exactly B rows per image: the first B, or the survivors repeated in score order, or zeros.

    Args:
        rows: per image Float[n_i, W], best score first (any n_i >= 0).
        roi_batch_size: B.

    Returns:
        Float[N, B, W]; for n_i < B, slot j holds row ``floor(j * n_i / B)``; for n_i = 0, zeros.
    """
    counts = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    zero_row = rows[0].new_zeros((1, rows[0].shape[1]))
    flat = torch.cat([*rows, zero_row])  # the last row is the zero fill of empty images
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(roi_batch_size, device=flat.device)
    offsets = torch.where(counts[:, None] >= roi_batch_size, slots, slots * counts[:, None] // roi_batch_size)
    index = torch.where(counts[:, None] > 0, starts[:, None] + offsets, flat.shape[0] - 1)  # (N, B)
    return flat[index]


class CovidMaskNet(nn.Module):
    """Transform -> backbone -> RPN -> RoI box branch -> ranked rows -> S.

    Args:
        transform, backbone, rpn, roi_heads: stages of a :class:`MaskRCNN` without mask branch.
        s_module: :class:`ClassificationModuleS` reading ``roi_batch_size`` rows.
        roi_batch_size: B.
        score_columns: ``"shared"`` or ``"per_class"`` (module docstring).
    """

    def __init__(self, *, transform: nn.Module, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module,
                 s_module: ClassificationModuleS, roi_batch_size: int, score_columns: str = "shared") -> None:
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = transform, backbone, rpn, roi_heads
        self.s_module = s_module
        self.roi_batch_size = roi_batch_size
        self.score_columns = score_columns
        self.train()

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Slice logits.

        Args:
            images: list (or batch) of FloatTensor[3, H, W] in [0, 1].

        Returns:
            FloatTensor[N, 3] logits of Control, CP and COVID-19 (softmax gives probabilities).
        """
        rows = self.ranked_detections(images)  # (N, B, W)
        return self.s_module(rows.flatten(start_dim=1))  # (N, W*B) -> (N, 3)

    def ranked_detections(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The B rows S reads for each image: Float[N, B, W] (laid out and filled as documented)."""
        return fill_ranked_rows(self.surviving_detections(images), self.roi_batch_size)

    def surviving_detections(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Per image the n_i <= B detections left after per-class NMS, best first: Float[n_i, W]."""
        batch, _ = self.transform(list(images))
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        logits, deltas = self.roi_heads.box_outputs(features, proposals, batch.image_sizes)
        rows = []
        for cand in self.roi_heads.candidates(logits, deltas, proposals, batch.image_sizes):
            keep = self.roi_heads.select(cand, score_thresh=SCORE_FILTER_OFF, nms_thresh=self.roi_heads.nms_thresh,
                                         max_detections=self.roi_batch_size)
            rows.append(torch.cat([self._score_columns(cand["scores"][keep], cand["labels"][keep], logits.shape[-1]),
                                   cand["deltas"][keep]], dim=1))  # (n_i, W)
        return rows

    def _score_columns(self, scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Float[n, 1] (shared) or Float[n, K-1] with each score in its class's column (per_class)."""
        if self.score_columns == "shared":
            return scores[:, None]
        return scores[:, None] * nn.functional.one_hot(labels - 1, num_classes - 1).to(scores.dtype)

    def train(self, mode: bool = True) -> "CovidMaskNet":
        """Set S's mode; the detector stages stay in eval mode (test-time proposals, frozen BN statistics)."""
        super().train(mode)
        for stage in (self.transform, self.backbone, self.rpn, self.roi_heads):
            stage.eval()
        return self


def trainable_parameter_names(model: CovidMaskNet) -> list[str]:
    """Names of the parameters the classifier trains: S and the backbone's BatchNorm affine ones."""
    names = [S_PREFIX + n for n, _ in model.s_module.named_parameters()]
    for module_name, module in model.backbone.named_modules():
        if isinstance(module, _BATCH_NORMS):
            names += [f"backbone.{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
    return names


def freeze_all_but_s_and_batchnorm(model: CovidMaskNet) -> int:
    """``requires_grad`` True for S and the backbone's BatchNorm affine parameters only.

    Returns:
        The number of trainable parameter values.
    """
    trainable = set(trainable_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def covid_mask_net(*, backbone_name: str, truncation: int, num_classes: int, roi_batch_size: int, s_features: int,
                   score_columns: str = "shared", **overrides) -> CovidMaskNet:
    """Build COVID-CT-Mask-Net on the segmentation model's stages (no mask branch).

    Args:
        backbone_name: "resnet18", "resnet34" or "resnet50".
        truncation: 0, 1 or 2 (resnet50: 0).
        num_classes: the segmentation model's classes including background: 2 (merge/ggo) or 3 (both).
        roi_batch_size: B, ranked detections per image read by S (128 lightweight, 256 resnet50).
        s_features: S's hidden width (512 lightweight, 1024 resnet50).
        score_columns: ``"shared"`` (the original's row, the default here so that checkpoints without
            this key rebuild as trained) or ``"per_class"`` (module docstring).
        **overrides: options of :func:`maskrcnn_resnet_fpn` (e.g. ``box_nms_thresh``, the NMS IoU of
            the ranked detections, default 0.75; ``rpn_nms_thresh``, default 0.75; ``min_size``,
            ``max_size``, ``preset``), except ``with_masks``, ``box_score_thresh`` and
            ``box_detections_per_img``, which the classifier sets itself.

    Returns:
        A :class:`CovidMaskNet` with only S and the backbone's BatchNorm affine parameters trainable.

    Raises:
        ValueError: for invalid sizes, reserved options, or anything :func:`maskrcnn_resnet_fpn` rejects.
    """
    _check_positive_int("roi_batch_size", roi_batch_size)
    _check_positive_int("s_features", s_features)
    if score_columns not in SCORE_COLUMNS:
        raise ValueError(f"score_columns must be one of {SCORE_COLUMNS}, got {score_columns!r}")
    reserved = sorted(set(overrides) & set(RESERVED_OPTIONS))
    if reserved:
        raise ValueError(f"covid_mask_net sets {reserved} itself (no mask branch, score filter off, B detections)")
    detector: MaskRCNN = maskrcnn_resnet_fpn(
        backbone_name=backbone_name, truncation=truncation, num_classes=num_classes,
        **{**CLASSIFIER_DEFAULTS, **overrides}, with_masks=False, box_score_thresh=SCORE_FILTER_OFF,
        box_detections_per_img=roi_batch_size)
    model = CovidMaskNet(transform=detector.transform, backbone=detector.backbone, rpn=detector.rpn,
                         roi_heads=detector.roi_heads, roi_batch_size=roi_batch_size, score_columns=score_columns,
                         s_module=ClassificationModuleS(roi_batch_size=roi_batch_size, s_features=s_features,
                                                        row_width=row_width(num_classes, score_columns)))
    freeze_all_but_s_and_batchnorm(model)
    return model


def load_segmentation_weights(model: CovidMaskNet, state_dict: dict[str, torch.Tensor], *, source: str = "state dict"
                              ) -> dict[str, int]:
    """Copy a segmentation model's weights into ``model`` by name; its mask-branch tensors are ignored.

    Args:
        model: the classifier.
        state_dict: a :class:`MaskRCNN` state dict (e.g. ``checkpoint["model"]``).
        source: where it came from, for error messages.

    Returns:
        ``{"loaded": n, "ignored_mask": n, "new": n}``: tensors copied, mask-branch tensors skipped,
        and classifier tensors absent from the source (those of S).

    Raises:
        ValueError: naming the tensors when a non-mask tensor has no place in the classifier, a
            detector tensor is missing from the source, or shapes differ.
    """
    own = model.state_dict()
    mask_keys = [k for k in state_dict if k not in own and _is_mask_branch(k)]
    unexpected = [k for k in state_dict if k not in own and k not in mask_keys]
    missing = [k for k in own if k not in state_dict and not k.startswith(S_PREFIX)]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    for problem, keys in (("has tensors the classifier lacks", unexpected), ("misses detector tensors", missing),
                          ("has tensors of other shapes (source vs classifier; check num_classes, backbone_name "
                           "and truncation)", wrong)):
        if keys:
            raise ValueError(f"{source} {problem}: {keys[:4]}{' ...' if len(keys) > 4 else ''}")
    loaded = {k: v for k, v in state_dict.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "ignored_mask": len(mask_keys), "new": len(own) - len(loaded)}


def _is_mask_branch(key: str) -> bool:
    return any(part.startswith("mask_") for part in key.split("."))
