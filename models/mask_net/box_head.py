"""Box head: RoI features -> representation (two FC layers) -> class logits and per-class deltas."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwoMLPHead(nn.Module):
    """Flatten the pooled RoI features and apply fc6 and fc7, each followed by ReLU.

    Args:
        in_channels: C * S * S of the pooled features.
        representation_size: width of both layers (128 for COVID-CT-Mask-Net, 1024 in torchvision).
    """

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FloatTensor[R, C, S, S] -> FloatTensor[R, representation_size]."""
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


class FastRCNNPredictor(nn.Module):
    """Class logits and class-specific box deltas from the box representation.

    Args:
        in_channels: representation size.
        num_classes: classes including background.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FloatTensor[R, D] -> (logits FloatTensor[R, K], deltas FloatTensor[R, 4K])."""
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)
