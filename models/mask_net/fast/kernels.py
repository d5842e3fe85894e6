"""Every private PyTorch and torchvision API of the fast path, and nothing else.

The fast stages call the wrappers here, never a private name. The private APIs may change or go in a
future release; each wrapper then reports its kernel as not usable and the stage runs its plain path
(same results, no speed-up), and :func:`warn_if_missing` says so once per fast copy.

- NNPACK's Winograd convolution: ``torch._nnpack_available``, ``torch._nnpack_spatial_convolution``
  (:func:`nnpack_usable`, :func:`nnpack_conv`);
- oneDNN's convolution with the ReLU and residual sum fused in:
  ``torch.ops.mkldnn._convolution_pointwise`` (unary and ``.binary``) and its in-place form
  ``torch.ops.mkldnn._convolution_pointwise_.binary`` (:func:`fused_conv_usable`, :func:`conv_relu`,
  :func:`conv_add_relu`);
- torchvision's pooler geometry: ``torchvision.ops.poolers._setup_scales`` (:func:`pooler_scales`).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torchvision.ops.poolers as tv_poolers
from torch import Tensor, nn


class FastPathFallbackWarning(UserWarning):
    """A private kernel of the fast path is missing from this PyTorch / torchvision: its stage runs the plain path."""


def _mkldnn_op(name: str, overload: str | None = None):
    """``torch.ops.mkldnn.<name>[.<overload>]``, or None where this build lacks it."""
    op = getattr(torch.ops.mkldnn, name, None)
    return op if op is None or overload is None else getattr(op, overload, None)


# Name shown to the reader -> lookup at call time (so a missing or monkeypatched-away name is seen).
_PRIVATE: dict[str, Callable[[], object]] = {
    "torch._nnpack_available": lambda: getattr(torch, "_nnpack_available", None),
    "torch._nnpack_spatial_convolution": lambda: getattr(torch, "_nnpack_spatial_convolution", None),
    "torch.ops.mkldnn._convolution_pointwise": lambda: _mkldnn_op("_convolution_pointwise"),
    "torch.ops.mkldnn._convolution_pointwise.binary": lambda: _mkldnn_op("_convolution_pointwise", "binary"),
    "torch.ops.mkldnn._convolution_pointwise_.binary": lambda: _mkldnn_op("_convolution_pointwise_", "binary"),
    "torchvision.ops.poolers._setup_scales": lambda: getattr(tv_poolers, "_setup_scales", None),
}
_NNPACK = ("torch._nnpack_available", "torch._nnpack_spatial_convolution")
_FUSED_CONV = ("torch.ops.mkldnn._convolution_pointwise", "torch.ops.mkldnn._convolution_pointwise.binary",
               "torch.ops.mkldnn._convolution_pointwise_.binary")


def missing() -> list[str]:
    """The private APIs of this module that the installed PyTorch / torchvision lack."""
    return [name for name, lookup in _PRIVATE.items() if lookup() is None]


def warn_if_missing() -> list[str]:
    """Issue one :class:`FastPathFallbackWarning` naming every missing private API; return their names."""
    names = missing()
    if names:
        warnings.warn(f"the CPU fast path runs the plain path where it would use {', '.join(names)}, which this "
                      f"PyTorch {torch.__version__} does not have; detections are unchanged, only slower",
                      FastPathFallbackWarning, stacklevel=3)
    return names


def _present(names: tuple[str, ...]) -> bool:
    return all(_PRIVATE[name]() is not None for name in names)


def nnpack_usable() -> bool:
    """NNPACK is built in and initialised (``_nnpack_available`` also initialises it: call before the first conv)."""
    return _present(_NNPACK) and bool(torch._nnpack_available())


def nnpack_conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int]) -> Tensor:
    """NNPACK's Winograd 3x3, stride-1 convolution: Float[N, C, H, W] (contiguous) -> Float[N, O, H, W]."""
    return torch._nnpack_spatial_convolution(x, weight, bias, padding, [1, 1])


def fused_conv_usable() -> bool:
    """oneDNN is built in and has the convolutions with fused ReLU and residual sum."""
    return torch.backends.mkldnn.is_available() and _present(_FUSED_CONV)


def _conv_args(conv: nn.Conv2d) -> tuple:
    return conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``relu(conv(x))`` in one oneDNN call (the ReLU is applied as each output tile is written)."""
    return torch.ops.mkldnn._convolution_pointwise(x, *_conv_args(conv), "relu", [], None)


def conv_add_relu(conv: nn.Conv2d, x: Tensor, identity: Tensor, *, in_place: bool) -> Tensor:
    """``relu(conv(x) + identity)`` in one oneDNN call; with ``in_place`` the result overwrites
    ``identity`` (no new output, so none of its pages are faulted in), which must be channels-last
    and used by nothing else."""
    args = (*_conv_args(conv), "add", 1.0, "relu", [], None)
    if in_place and identity.is_contiguous(memory_format=torch.channels_last):
        return torch.ops.mkldnn._convolution_pointwise_.binary(identity, x, *args)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, identity, *args)


def pooler_scales(maps: list[Tensor], image_shapes: list[tuple[int, int]], canonical_scale: int,
                  canonical_level: int) -> tuple[list[float], Callable] | None:
    """torchvision's ``(scales, map_levels)`` of a ``MultiScaleRoIAlign`` for these maps, or None
    where torchvision no longer has the helper (the pooler then runs torchvision's forward)."""
    setup = _PRIVATE["torchvision.ops.poolers._setup_scales"]()
    return None if setup is None else setup(maps, image_shapes, canonical_scale, canonical_level)


def pooler_scales_usable() -> bool:
    """torchvision still has the helper behind :func:`pooler_scales`."""
    return _present(("torchvision.ops.poolers._setup_scales",))
