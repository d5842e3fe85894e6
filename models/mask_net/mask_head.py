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

    def forward_for_labels(self, x: torch.Tensor, labels: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Logits of each RoI's own class only, FloatTensor[R, 1, 2S, 2S]; equal to ``forward`` then indexing.

        The 2x2 stride-2 transposed conv is computed as one matrix product (each input pixel
        produces its own 2x2 output block), and only the label's 1x1 logit filter is applied. RoIs
        go ``chunk`` at a time, so the upsampled hidden map (0.8 MB per RoI at S=14, D=256) stays
        small and in cache instead of one fresh 80 MB buffer for 100 detections.

        Args:
            x: FloatTensor[R, C, S, S].
            labels: Int64Tensor[R], the class of each RoI.
            chunk: RoIs per matrix product.
        """
        r, c, s, _ = x.shape
        up = self.conv5_mask
        dim = up.weight.shape[1]
        pixels = x.permute(0, 2, 3, 1).reshape(r * s * s, c)  # (R*S*S, C)
        kernel = up.weight.permute(2, 3, 1, 0).reshape(4 * dim, c)  # (2*2*D, C), block-position major
        bias = up.bias.repeat(4)
        weight = self.mask_fcn_logits.weight[labels, :, 0, 0]  # (R, D)
        parts = [x.new_zeros((0, s * s * 4, 1))]  # R may be 0
        for start in range(0, r, chunk):
            stop = min(start + chunk, r)
            hidden = torch.relu_(torch.addmm(bias, pixels[start * s * s:stop * s * s], kernel.t()))  # (n*S*S, 2*2*D)
            parts.append(torch.bmm(hidden.view(stop - start, s * s * 4, dim), weight[start:stop, :, None]))
        logits = torch.cat(parts).view(r, s, s, 2, 2).permute(0, 1, 3, 2, 4)  # (R, S, 2, S, 2)
        return logits.reshape(r, 1, 2 * s, 2 * s) + self.mask_fcn_logits.bias[labels][:, None, None, None]
