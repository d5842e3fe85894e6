"""Mask head: RoI features -> 3x3 conv layers -> 2x transposed conv -> per-class mask logits."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation


class MaskHead(nn.Sequential):
    """A stack of 3x3 conv + ReLU layers (one of 128 for the lightweight models, four of 256 in torchvision).

    Args:
        in_channels: channels of the pooled RoI features.
        layers: output channels of each layer.
        dilation: dilation of the convolutions.
    """

    def __init__(self, in_channels: int, layers: tuple[int, ...], dilation: int = 1) -> None:
        blocks, channels = [], in_channels
        for width in layers:
            blocks.append(Conv2dNormActivation(channels, width, kernel_size=3, dilation=dilation, norm_layer=None))
            channels = width
        super().__init__(*blocks)
        self.out_channels = channels
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


class MaskPredictor(nn.Module):
    """2x upsampling by a transposed conv + ReLU, then 1x1 conv to one logit map per class.

    Args:
        in_channels: channels of the mask head's output.
        dim_reduced: channels after the transposed conv.
        num_classes: classes including background.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FloatTensor[R, C, S, S] -> logits of every class, FloatTensor[R, K, 2S, 2S]."""
        return self.mask_fcn_logits(self.relu(self.conv5_mask(x)))

    def forward_for_labels(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits of each RoI's own class only, FloatTensor[R, 1, 2S, 2S] (no work for other classes).

        Args:
            x: FloatTensor[R, C, S, S].
            labels: Int64Tensor[R], the class of each RoI.
        """
        hidden = self.relu(self.conv5_mask(x))  # (R, D, 2S, 2S)
        weight = self.mask_fcn_logits.weight[labels, :, 0, 0]  # (R, D)
        bias = self.mask_fcn_logits.bias[labels]
        return (torch.einsum("rdhw,rd->rhw", hidden, weight) + bias[:, None, None])[:, None]
