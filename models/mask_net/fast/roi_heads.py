"""Inference-only RoI heads of the fast copy: pooling by row gathers from one channels-last table of
the FPN levels, shared by the box and mask poolers, and the box branch in chunks of RoIs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign

from ..box_head import TwoMLPHead
from ..roi_heads import RoIHeads
from . import kernels
from .poolers import GatherMultiScaleRoIAlign, LevelRows, cpu_inference, split_boxes, use_gather_poolers


class ChannelsLastTwoMLPHead(TwoMLPHead):
    """:class:`TwoMLPHead` whose fc6 takes each RoI's pooled features in (S, S, C) order, the order
    :class:`~.poolers.GatherMultiScaleRoIAlign` writes them in, so flattening them is a view rather
    than a copy (50 MB for 1,000 RoIs). :func:`use_gather_pooling` permutes fc6's weight columns to
    match, so the results are those of the parent for input of any layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FloatTensor[R, C, S, S] -> FloatTensor[R, representation_size]."""
        return F.relu(self.fc7(F.relu(self.fc6(x.permute(0, 2, 3, 1).flatten(start_dim=1)))))


class InferenceRoIHeads(RoIHeads):
    """:class:`RoIHeads` that, at CPU inference, lays the FPN levels out once as a :class:`~.poolers.LevelRows`
    table for both poolers (only for a batch with proposals), and runs the box branch ``box_chunk``
    RoIs at a time (each chunk's pooled features, 12.5 MB for 256 RoIs of 256 x 7 x 7, reuse the
    memory of the one before instead of one 50 MB block whose pages are faulted in afresh on every
    slice). Same results as the parent."""

    box_chunk = 256

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict] | None = None) -> tuple[list[dict], dict]:
        """As :meth:`RoIHeads.forward`."""
        if not self.training and any(len(p) for p in proposals) and cpu_inference(list(features.values()), proposals):
            features = LevelRows({name: features[name] for p in self.poolers for name in p.featmap_names})
        return super().forward(features, proposals, image_sizes, targets)

    def box_outputs(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                    image_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`RoIHeads.box_outputs`, in chunks of RoIs."""
        total = sum(len(p) for p in proposals)
        if self.training or total <= self.box_chunk:
            return super().box_outputs(features, proposals, image_sizes)
        parts = [super(InferenceRoIHeads, self).box_outputs(features, part, image_sizes)
                 for part in split_boxes(proposals, -(-total // self.box_chunk))]
        return torch.cat([logits for logits, _ in parts]), torch.cat([deltas for _, deltas in parts])


def use_gather_pooling(roi_heads: RoIHeads) -> RoIHeads:
    """Switch, in place, a :class:`RoIHeads` with torchvision's ``MultiScaleRoIAlign`` poolers to new fast
    poolers with the same settings (:func:`~.poolers.fast_pooler`) and, where all of them gather, to
    :class:`InferenceRoIHeads` with, for a :class:`TwoMLPHead` box head, :class:`ChannelsLastTwoMLPHead`
    and fc6's weight columns permuted from (C, S, S) to (S, S, C). Without torchvision's scale helper
    (:mod:`.kernels`) ``roi_heads`` stays as it is. Poolers already of the fast kind are kept."""
    if (type(roi_heads) is not RoIHeads or any(not isinstance(p, MultiScaleRoIAlign) for p in roi_heads.poolers)
            or not kernels.pooler_scales_usable()):
        return roi_heads
    use_gather_poolers(roi_heads)
    if any(type(p) is not GatherMultiScaleRoIAlign for p in roi_heads.poolers):
        return roi_heads
    roi_heads.__class__ = InferenceRoIHeads
    head = roi_heads.box_head
    if type(head) is TwoMLPHead:
        size = roi_heads.box_roi_pool.output_size
        weight = head.fc6.weight.data
        columns = weight.view(weight.shape[0], -1, *size).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        head.fc6.weight.data = columns.contiguous()
        head.__class__ = ChannelsLastTwoMLPHead
    return roi_heads
