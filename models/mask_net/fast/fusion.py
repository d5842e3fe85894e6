"""Inference-only forms of the convolution stages, used by :func:`~models.mask_net.fast.fast_inference_copy`:
same parameters and results (up to float rounding), less work and fewer temporaries on CPU.

- BatchNorm folded into the preceding convolution (:func:`fold_batchnorm`);
- Winograd 3x3 convolutions (:class:`WinogradConv2d`);
- an FPN with matrix-product laterals and in-place top-down sums (:class:`InferenceFPN`);
- an RPN head whose two 1x1 heads are one product (:class:`InferenceRPNHead`);
- ResNet blocks whose ReLUs and residual sums run inside oneDNN's convolutions
  (:class:`InferenceBottleneck`, :class:`InferenceBasicBlock`).

The RoI heads' forms are in :mod:`.roi_heads` and :mod:`.poolers`, the private kernels in :mod:`.kernels`.

Folding: in eval mode ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta``; the BatchNorm becomes an identity. Works for
``nn.BatchNorm2d`` and ``torchvision.ops.FrozenBatchNorm2d``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import resnet
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from ..rpn import RPNHead
from . import kernels
from .kernels import conv_add_relu, conv_relu

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


def _needs_grad(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _cpu_float32_inference(x: torch.Tensor, module: nn.Module) -> bool:
    """``x`` is a CPU float32 tensor and no gradient is needed: where the CPU inference kernels apply."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not _needs_grad(x, module)


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1 convolution that runs NNPACK's Winograd kernels for CPU float32 inference.

    Same parameters and results (to about 1e-5 relative) as ``nn.Conv2d``; about 2-3x fewer
    multiplications. NNPACK transforms the kernel on every call, and its batched path is slow on
    large maps (measured in benchmarks/README.md), so the path depends on the input (:meth:`path`):

    - maps of at least ``min_pixels`` (30 x 30) pixels: NNPACK one image at a time;
    - smaller maps with ``min_batch_pixels`` pixels in all (the mask head's 14 x 14 RoIs, from
      about 16 RoIs on): one batched NNPACK call;
    - anything smaller (the FPN's 25 x 25 and 13 x 13 levels, a few RoIs): oneDNN, the parent.

    The parent also runs on other devices and dtypes, when NNPACK is not built in (or this PyTorch
    lacks its private entry points, :mod:`.kernels`), and whenever gradients are needed.
    """

    min_pixels = 900
    min_batch_pixels = 3000

    def path(self, x: torch.Tensor) -> str:
        """"per_image", "batched" or "direct" (the parent) for input FloatTensor[N, C, H, W]."""
        # nnpack_usable() also initialises NNPACK, so it must run before the first call.
        if not _cpu_float32_inference(x, self) or not kernels.nnpack_usable():
            return "direct"
        pixels = x.shape[-2] * x.shape[-1]
        if pixels >= self.min_pixels:
            return "per_image"
        return "batched" if x.shape[0] * pixels >= self.min_batch_pixels else "direct"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FloatTensor[N, C, H, W] -> FloatTensor[N, O, H, W] (NCHW-contiguous on the NNPACK paths)."""
        path = self.path(x)
        if path == "direct":
            return super().forward(x)
        x = x.contiguous()
        try:
            if path == "batched" or x.shape[0] == 1:
                return self._nnpack(x)
            return torch.cat([self._nnpack(image[None]) for image in x])
        except RuntimeError:  # a shape NNPACK declines: the reference path gives the same result
            return super().forward(x)

    def _nnpack(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.nnpack_conv(x, self.weight, self.bias, list(self.padding))


def _winograd_eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def use_winograd_convolutions(model: nn.Module) -> nn.Module:
    """Replace, in place, every eligible 3x3 stride-1 ``nn.Conv2d`` by a :class:`WinogradConv2d` sharing
    its parameters."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _winograd_eligible(child):
                fast = WinogradConv2d(child.in_channels, child.out_channels, 3, padding=child.padding,
                                      bias=child.bias is not None, device="meta")
                fast.weight = child.weight
                fast.bias = child.bias
                setattr(module, name, fast)
    return model


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one matrix product per image, written into a new NCHW-contiguous tensor.

    A channels-last ``x`` is read in place (its pixels are the columns of a transposed matrix), so
    this also changes the layout for free where ``F.conv2d`` would keep channels-last and a later
    NCHW consumer would copy.

    Args:
        x: FloatTensor[B, C, H, W], any memory layout.
        weight: FloatTensor[O, C] (or [O, C, 1, 1]).
        bias: FloatTensor[O] or None.

    Returns:
        FloatTensor[B, O, H, W], contiguous.
    """
    b, c, h, w = x.shape
    weight = weight.reshape(weight.shape[0], c)
    out = x.new_empty((b, weight.shape[0], h, w))
    for i in range(b):
        columns, dest = x[i].reshape(c, h * w), out[i].view(weight.shape[0], h * w)
        if bias is None:
            torch.mm(weight, columns, out=dest)
        else:
            torch.addmm(bias[:, None], weight, columns, out=dest)
    return out


def add_upsampled_(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``fine += F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")``, in place.

    For the FPN's exact 2x steps this is one broadcast add over a (H/2, 2, W/2, 2) view, with no
    upsampled copy (nearest's source pixel of ``2i + a`` is ``i``).

    Args:
        fine: FloatTensor[B, C, H, W], contiguous.
        coarse: FloatTensor[B, C, h, w].
    """
    b, c, h, w = coarse.shape
    if tuple(fine.shape[-2:]) == (2 * h, 2 * w) and fine.is_contiguous():
        fine.view(b, c, h, 2, w, 2).add_(coarse[:, :, :, None, :, None])
    else:
        fine.add_(F.interpolate(coarse, size=fine.shape[-2:], mode="nearest"))
    return fine


class InferenceFPN(FeaturePyramidNetwork):
    """``torchvision.ops.FeaturePyramidNetwork`` with the same parameters and results, for inference.

    Its lateral 1x1 convolutions are matrix products that read the body's channels-last maps and
    write NCHW (what the Winograd 3x3 layers take), and each top-down step is added in place. On
    a 512x512 slice (800x800 after resizing) this avoids three 41 MB temporaries at the finest level
    (lateral layout copy, upsampled map, sum) and their page faults. With gradients it runs the parent.
    """

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ordered dict of FloatTensor[B, C_l, H_l, W_l], fine to coarse -> the FPN's ordered dict."""
        names, features = list(x), list(x.values())
        if _needs_grad(features[0], self):
            return super().forward(x)
        last = self._lateral(features[-1], -1)
        results = [self.layer_blocks[-1](last)]
        for idx in range(len(features) - 2, -1, -1):
            last = add_upsampled_(self._lateral(features[idx], idx), last)
            results.insert(0, self.layer_blocks[idx](last))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))

    def _lateral(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        conv = self.inner_blocks[idx][0]
        return conv1x1(x, conv.weight, conv.bias)


def _plain_1x1_laterals(fpn: FeaturePyramidNetwork) -> bool:
    return all(len(block) == 1 and type(block[0]) is nn.Conv2d and block[0].kernel_size == (1, 1)
               and block[0].stride == (1, 1) and block[0].groups == 1 for block in fpn.inner_blocks)


class InferenceRPNHead(RPNHead):
    """:class:`RPNHead` with the objectness and box-delta 1x1 convolutions run as one matrix product
    per level (one read of the 256-channel map instead of two). Same parameters and results."""

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: objectness FloatTensor[B, A, H, W] and deltas FloatTensor[B, 4A, H, W]."""
        if _needs_grad(features[0], self):
            return super().forward(features)
        anchors = self.cls_logits.out_channels
        weight = torch.cat((self.cls_logits.weight, self.bbox_pred.weight)).flatten(1)  # (5A, C)
        bias = torch.cat((self.cls_logits.bias, self.bbox_pred.bias))
        both = [conv1x1(self.conv(f), weight, bias) for f in features]  # (B, 5A, H, W) each
        return [o[:, :anchors] for o in both], [o[:, anchors:] for o in both]


def use_inference_fpn_and_rpn_head(model: nn.Module) -> nn.Module:
    """Switch, in place, every plain ``FeaturePyramidNetwork`` to :class:`InferenceFPN` and every
    :class:`RPNHead` to :class:`InferenceRPNHead` (same modules and parameters, other forward)."""
    for module in model.modules():
        if type(module) is FeaturePyramidNetwork and _plain_1x1_laterals(module):
            module.__class__ = InferenceFPN
        elif type(module) is RPNHead:
            module.__class__ = InferenceRPNHead
    return model


def _fusable_on(x: torch.Tensor, module: nn.Module) -> bool:
    """oneDNN's fused convolutions apply: CPU float32 inference with the ops built in."""
    return _cpu_float32_inference(x, module) and kernels.fused_conv_usable()


class _FusedBlock:
    """Shared part of the fused ResNet blocks. ``owns_input`` (set by :func:`use_fused_residual_blocks`)
    says that nothing but this block reads its input, so the residual sum may be written over it."""

    owns_input = False

    def _identity(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The residual branch and whether it may be overwritten."""
        if self.downsample is not None:
            return self.downsample(x), True
        return x, self.owns_input


class InferenceBottleneck(_FusedBlock, resnet.Bottleneck):
    """torchvision's ``Bottleneck`` with folded BatchNorms, its ReLUs and residual sum fused into the
    convolutions (three oneDNN calls, no separate add or ReLU pass). Same parameters and results;
    the parent runs when gradients are needed, off CPU or without the fused kernels (:mod:`.kernels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B, C, H, W] -> FloatTensor[B, 4P, H/s, W/s]."""
        if not _fusable_on(x, self):
            return super().forward(x)
        identity, in_place = self._identity(x)
        out = conv_relu(self.conv2, conv_relu(self.conv1, x))
        return conv_add_relu(self.conv3, out, identity, in_place=in_place)


class InferenceBasicBlock(_FusedBlock, resnet.BasicBlock):
    """torchvision's ``BasicBlock`` with folded BatchNorms, fused like :class:`InferenceBottleneck`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B, C, H, W] -> FloatTensor[B, P, H/s, W/s]."""
        if not _fusable_on(x, self):
            return super().forward(x)
        identity, in_place = self._identity(x)
        return conv_add_relu(self.conv2, conv_relu(self.conv1, x), identity, in_place=in_place)


_FUSED_BLOCKS = {resnet.Bottleneck: InferenceBottleneck, resnet.BasicBlock: InferenceBasicBlock}


def _folded(block: nn.Module) -> bool:
    norms = [m for name, m in block.named_children() if name.startswith("bn")]
    convs = [m for name, m in block.named_children() if name.startswith("conv")]
    return (all(isinstance(n, nn.Identity) for n in norms) and all(type(c) is nn.Conv2d for c in convs)
            and (block.downsample is None or not any(isinstance(m, _NORMS) for m in block.downsample.modules())))


def use_fused_residual_blocks(model: nn.Module) -> nn.Module:
    """Switch, in place, every torchvision ResNet block whose BatchNorms are folded (see
    :func:`fold_batchnorm`) to its fused inference form; a block after the first of its stage owns
    its input (the previous block's output, which nothing else reads)."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for index, block in enumerate(module):
            if type(block) in _FUSED_BLOCKS and _folded(block):
                block.__class__ = _FUSED_BLOCKS[type(block)]
                block.owns_input = index > 0
    return model
