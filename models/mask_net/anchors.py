"""Anchor stage: reference boxes at every position of every feature level.

Each level has its own anchor sizes; every size is combined with every aspect ratio (height /
width). The cell anchors are centred on (0, 0), rounded to integer pixels, and shifted by the
level's stride over the feature grid, in (y, x, anchor) order.
"""
from __future__ import annotations

import torch
from torch import nn


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """Zero-centred anchors, FloatTensor[len(ratios) * len(sizes), 4] xyxy, ratio-major."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for a list of feature maps.

    Args:
        sizes: per level, the anchor sizes (side of the square anchor of ratio 1) in input pixels.
        aspect_ratios: per level, the height / width ratios.
    """

    def __init__(self, sizes: tuple[tuple[float, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...]) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"one tuple of sizes per level and one of aspect ratios per level are needed, got "
                             f"{len(sizes)} and {len(aspect_ratios)}")
        self.sizes, self.aspect_ratios = tuple(sizes), tuple(aspect_ratios)
        self.cells = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        """Anchors at each position, per level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def forward(self, batch_shape: tuple[int, int], feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Anchors of all levels for one image of the padded batch.

        Args:
            batch_shape: (height, width) of the padded batch tensor.
            feature_maps: FloatTensor[B, C, H_l, W_l] per level.

        Returns:
            FloatTensor[sum_l H_l * W_l * A_l, 4] xyxy in input pixels (the same for every image).
        """
        if len(feature_maps) != len(self.cells):
            raise ValueError(f"anchors are configured for {len(self.cells)} feature levels, got {len(feature_maps)}")
        device, dtype = feature_maps[0].device, feature_maps[0].dtype
        levels = [self._grid(cell.to(device=device, dtype=dtype), fmap.shape[-2:], batch_shape)
                  for cell, fmap in zip(self.cells, feature_maps)]
        return torch.cat(levels)

    @staticmethod
    def _grid(cell: torch.Tensor, grid: torch.Size, batch_shape: tuple[int, int]) -> torch.Tensor:
        stride_h, stride_w = batch_shape[0] // grid[0], batch_shape[1] // grid[1]
        shifts_x = torch.arange(0, grid[1], dtype=torch.int32, device=cell.device) * stride_w
        shifts_y = torch.arange(0, grid[0], dtype=torch.int32, device=cell.device) * stride_h
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4)  # (H * W * A, 4)
