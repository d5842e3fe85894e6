"""Box regression coding: deltas (dx, dy, dw, dh) between reference boxes and target boxes.

The parametrisation is Faster R-CNN's: centre offsets relative to the reference size and log size
ratios, each multiplied by a weight. Decoded log ratios are clipped at log(1000/16) so that an
untrained head cannot produce infinite boxes.
"""
from __future__ import annotations

import math

import torch

DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)


def _centres_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


class BoxCoder:
    """Encode boxes as deltas relative to reference boxes, and decode deltas back to boxes.

    Args:
        weights: multipliers for (dx, dy, dw, dh); (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for RoIs.
        xform_clip: upper bound of decoded dw and dh.
    """

    def __init__(self, weights: tuple[float, float, float, float], xform_clip: float = DEFAULT_XFORM_CLIP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.xform_clip = xform_clip

    def encode(self, targets: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Deltas that move ``references`` onto ``targets``.

        Args:
            targets: FloatTensor[N, 4], xyxy.
            references: FloatTensor[N, 4], xyxy, positive widths and heights.

        Returns:
            FloatTensor[N, 4] of weighted (dx, dy, dw, dh).
        """
        wx, wy, ww, wh = self.weights
        ref_x, ref_y, ref_w, ref_h = _centres_and_sizes(references)
        gt_x, gt_y, gt_w, gt_h = _centres_and_sizes(targets)
        return torch.stack((wx * (gt_x - ref_x) / ref_w, wy * (gt_y - ref_y) / ref_h,
                            ww * torch.log(gt_w / ref_w), wh * torch.log(gt_h / ref_h)), dim=1)

    def decode(self, deltas: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Boxes obtained by applying ``deltas`` to ``references``.

        Args:
            deltas: FloatTensor[N, 4 * C]: C sets of weighted (dx, dy, dw, dh) per reference box.
            references: FloatTensor[N, 4], xyxy.

        Returns:
            FloatTensor[N, C, 4], xyxy.
        """
        references = references.to(deltas.dtype)
        ctr_x, ctr_y, widths, heights = _centres_and_sizes(references)
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.xform_clip)
        pred_x = dx * widths[:, None] + ctr_x[:, None]
        pred_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=2)
