"""Fold BatchNorm into the preceding convolution for inference.

In eval mode ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta``; the BatchNorm becomes an identity. Works for
``nn.BatchNorm2d`` and ``torchvision.ops.FrozenBatchNorm2d``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import FrozenBatchNorm2d

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of (conv, bn) children that run back to back: convN/bnN attributes or Sequential neighbours."""
    children = dict(module.named_children())
    names = list(children)
    if isinstance(module, nn.Sequential):
        return [(a, b) for a, b in zip(names, names[1:])
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], _NORMS)]
    return [(f"conv{n[2:]}", n) for n in names if n.startswith("bn") and isinstance(children[n], _NORMS)
            and isinstance(children.get(f"conv{n[2:]}"), nn.Conv2d)]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every (conv, BatchNorm) pair of ``model`` in place; ``model`` must be in eval mode.

    Returns:
        ``model``, with folded convolutions and ``nn.Identity`` in place of the BatchNorms.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (it uses the running statistics)")
    for module in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(bn, FrozenBatchNorm2d):
                bn = _as_batchnorm(bn)
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
    return model


def _as_batchnorm(frozen: FrozenBatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(frozen.weight.shape[0], eps=frozen.eps).eval()
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).data.copy_(getattr(frozen, name))
    return bn


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1 convolution that runs NNPACK's Winograd kernels for CPU float32 inference.

    Same parameters and results (to about 1e-5 relative) as ``nn.Conv2d``; about 2-3x fewer
    multiplications. Falls back to ``nn.Conv2d`` on other devices and dtypes, when NNPACK is not
    built in, and whenever gradients are needed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        # _nnpack_available() also initialises NNPACK, so it must run before the first call.
        if x.device.type != "cpu" or x.dtype != torch.float32 or needs_grad or not torch._nnpack_available():
            return super().forward(x)
        try:
            return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, list(self.padding), [1, 1])
        except RuntimeError:  # a shape NNPACK declines: the reference path gives the same result
            return super().forward(x)


def _winograd_eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def use_winograd_convolutions(model: nn.Module) -> nn.Module:
    """Replace, in place, every eligible 3x3 stride-1 ``nn.Conv2d`` by a :class:`WinogradConv2d` sharing its parameters."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _winograd_eligible(child):
                fast = WinogradConv2d(child.in_channels, child.out_channels, 3, padding=child.padding,
                                      bias=child.bias is not None, device="meta")
                fast.weight = child.weight
                fast.bias = child.bias
                setattr(module, name, fast)
    return model
