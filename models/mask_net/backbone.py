"""Backbone stage: a (possibly truncated) torchvision ResNet body followed by an FPN.

ResNet18/34 with ``truncation`` 0, 1 or 2 keep layer4, drop layer4, or drop layer3 and layer4; only
the last kept stage feeds a single-level, 256-channel FPN (no extra max-pool level), as in
COVID-CT-Mask-Net. ResNet50 feeds all four stages to the FPN; the torchvision preset adds
torchvision's max-pool level "pool". Channel widths are read from the modules.

BatchNorm: the body uses ordinary ``nn.BatchNorm2d`` by default (the original trained it), so that
its affine parameters can be trained while its running statistics stay frozen by keeping the
layers in eval mode (what the COVID-CT-Mask-Net classifier does). ``norm="frozen"`` uses
``torchvision.ops.FrozenBatchNorm2d`` instead, whose statistics and affine values are buffers.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}
STAGES = ("layer1", "layer2", "layer3", "layer4")
NORMS = {"batchnorm": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}


def out_channels_of(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage, read from its last block's last BatchNorm."""
    norms = [m for m in stage[-1].modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    return int(norms[-1].weight.shape[0])


class ResNetBody(nn.Module):
    """The ResNet stem and stages up to ``last_stage``; returns the chosen stages' feature maps.

    Args:
        net: a torchvision ResNet (its avgpool, fc and stages after ``last_stage`` are dropped).
        last_stage: index (1-4) of the last kept stage.
        returned: stage indices whose outputs are returned, in increasing order.
    """

    def __init__(self, net: resnet.ResNet, *, last_stage: int, returned: tuple[int, ...]) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", *STAGES[:last_stage]):
            self.add_module(name, getattr(net, name))
        self.returned = tuple(STAGES[i - 1] for i in returned)

    @property
    def out_channels_list(self) -> list[int]:
        """Channels of every returned feature map."""
        return [out_channels_of(getattr(self, name)) for name in self.returned]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Map FloatTensor[B, 3, H, W] to {"0": stride-4 map, ...}, one entry per returned stage."""
        features = OrderedDict()
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name, stage in self.named_children():
            if name in STAGES:
                x = stage(x)
                if name in self.returned:
                    features[str(len(features))] = x
        return features


class BackboneWithFPN(nn.Module):
    """ResNet body + FPN; every output level has ``out_channels`` channels.

    Attributes:
        body: :class:`ResNetBody`.
        fpn: ``torchvision.ops.FeaturePyramidNetwork``.
        out_channels: channels of every FPN level.
    """

    def __init__(self, body: ResNetBody, *, out_channels: int, extra_pool_level: bool) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels_list, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_pool_level else None)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """FloatTensor[B, 3, H, W] -> ordered dict of FloatTensor[B, out_channels, H_l, W_l], fine to coarse."""
        return self.fpn(self.body(images))


def resnet_fpn_backbone(*, backbone_name: str, truncation: int, out_channels: int = 256, extra_pool_level: bool = False,
                        norm: str = "batchnorm") -> BackboneWithFPN:
    """Build a ResNet+FPN backbone.

    Args:
        backbone_name: "resnet18", "resnet34" or "resnet50".
        truncation: 0 full, 1 without layer4, 2 without layer3 and layer4.
        out_channels: FPN channels.
        extra_pool_level: add torchvision's max-pooled "pool" level after the coarsest level.
        norm: "batchnorm" (trainable ``nn.BatchNorm2d``) or "frozen" (``FrozenBatchNorm2d``).

    Returns:
        The backbone. ResNet18/34 return their last kept stage only; ResNet50 all four stages.
    """
    net = RESNETS[backbone_name](weights=None, norm_layer=NORMS[norm])
    last_stage = 4 - truncation
    returned = tuple(range(1, last_stage + 1)) if backbone_name == "resnet50" else (last_stage,)
    body = ResNetBody(net, last_stage=last_stage, returned=returned)
    return BackboneWithFPN(body, out_channels=out_channels, extra_pool_level=extra_pool_level)


def load_resnet_weights(body: ResNetBody, path: str) -> dict[str, list[str]]:
    """Load a torchvision ResNet state dict saved at ``path`` into ``body``.

    Keys of dropped parts (``fc.*`` and truncated stages) are ignored; every kept parameter must be
    present with the right shape.

    Returns:
        {"loaded": keys copied, "ignored": keys of the file not used}.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a state dict, misses kept keys, or shapes differ.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a ResNet state dict, got {type(state).__name__}")
    own = body.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: not a matching torchvision ResNet state dict; missing {len(missing)} keys "
                         f"such as {missing[:3]}")
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: shape mismatch for {wrong[:3]} (e.g. {tuple(state[wrong[0]].shape)} vs "
                         f"{tuple(own[wrong[0]].shape)}); is it the right ResNet depth?")
    body.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return {"loaded": [k for k in own if k in state], "ignored": [k for k in state if k not in own]}
