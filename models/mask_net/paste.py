"""Paste fixed-size mask probabilities into full images, all masks at once.

Each M x M mask is padded by one pixel, its box is enlarged by (M + 2) / M and rounded towards zero
to integer pixels, and the padded mask is resized bilinearly (half-pixel centres) onto the box's
(h + 1) x (w + 1) pixels. Bilinear resizing is separable, so for every mask the image is
``Wy @ mask @ Wx^T`` with sparse interpolation matrices that are zero outside the box: one batched
matrix product replaces a Python loop over masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale xyxy ``boxes`` (FloatTensor[N, 4]) about their centres by ``scale``."""
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    ctr_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    ctr_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h), dim=1)


def interpolation_matrix(start: torch.Tensor, end: torch.Tensor, first_pixel: torch.Tensor, out_len: int,
                         in_len: int) -> torch.Tensor:
    """Bilinear (align_corners=False) weights that stretch ``in_len`` samples onto pixels start..end.

    Args:
        start: Int64Tensor[N], first pixel of each box along this axis (may be negative).
        end: Int64Tensor[N], last pixel of each box (inclusive).
        first_pixel: Int64Tensor[N], image pixel of each window's first row.
        out_len: window length.
        in_len: mask length along this axis.

    Returns:
        FloatTensor[N, out_len, in_len]; rows of pixels outside the box are zero.
    """
    size = (end - start + 1).clamp(min=1)  # pixels the mask is resized to
    local = first_pixel[:, None] + torch.arange(out_len, device=start.device) - start[:, None]  # (N, out_len)
    inside = (local >= 0) & (local < size[:, None])
    scale = in_len / size.to(torch.float32)
    src = ((local.to(torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    low = src.to(torch.int64).clamp(max=in_len - 1)
    frac = src - low.to(torch.float32)
    high = torch.where(low < in_len - 1, low + 1, low)
    weights = torch.zeros((start.shape[0], out_len, in_len), device=start.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights


def _window(start: torch.Tensor, end: torch.Tensor, image_len: int) -> tuple[torch.Tensor, int]:
    """First pixel and common length of windows along one axis that cover every box's visible part."""
    length = int(min((end - start + 1).clamp(min=1).max().item(), image_len))
    first = start.clamp(min=0).clamp(max=image_len - length)
    return first, length


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                padding: int = 1) -> torch.Tensor:
    """Paste per-box masks into images of ``image_size``.

    The resized masks are computed only inside a window as large as the largest box and then
    scattered into the zero images.

    Args:
        masks: FloatTensor[N, 1, M, M] probabilities of each box's mask.
        boxes: FloatTensor[N, 4], xyxy in the image's pixels.
        image_size: (height, width) of the image.
        padding: zero border added to each mask before resizing.

    Returns:
        FloatTensor[N, 1, height, width].
    """
    height, width = image_size
    num = masks.shape[0]
    if num == 0:
        return masks.new_zeros((0, 1, height, width))
    size = masks.shape[-1]
    padded = F.pad(masks[:, 0], (padding,) * 4)  # (N, M + 2p, M + 2p)
    x0, y0, x1, y1 = expand_boxes(boxes, float(size + 2 * padding) / size).to(torch.int64).unbind(1)
    top, win_h = _window(y0, y1, height)
    left, win_w = _window(x0, x1, width)
    rows = interpolation_matrix(y0, y1, top, win_h, padded.shape[-2]).to(masks.dtype)
    cols = interpolation_matrix(x0, x1, left, win_w, padded.shape[-1]).to(masks.dtype)
    crops = torch.bmm(torch.bmm(rows, padded), cols.transpose(1, 2))  # (N, win_h, win_w)
    ys = top[:, None] + torch.arange(win_h, device=masks.device)  # (N, win_h)
    xs = left[:, None] + torch.arange(win_w, device=masks.device)  # (N, win_w)
    flat_index = (ys[:, :, None] * width + xs[:, None, :]).reshape(num, -1)
    out = masks.new_zeros((num, height * width))
    out.scatter_(1, flat_index, crops.reshape(num, -1))
    return out.view(num, 1, height, width)
