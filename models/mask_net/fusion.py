"""Fold BatchNorm into the preceding convolution for inference.

In eval mode ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta``; the BatchNorm becomes an identity. Works for
``nn.BatchNorm2d`` and ``torchvision.ops.FrozenBatchNorm2d``.
"""
from __future__ import annotations

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
