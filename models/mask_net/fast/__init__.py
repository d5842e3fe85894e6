"""The CPU fast path: an inference-only copy of a Mask R-CNN, kept off the readable model.

:func:`fast_inference_copy` returns a new model that gives the same detections (up to float
rounding, about 1e-5 relative) faster on CPU; the model it came from is left as it is, so it still
trains, saves and loads its own checkpoints. The copy is for inference only: BatchNorm is folded
away and fc6 reads its input in another order, so its state dict fits no checkpoint.

- :mod:`.kernels`: the only place that calls private PyTorch / torchvision APIs; where one is
  missing its stage runs the plain path (one :class:`~.kernels.FastPathFallbackWarning` per copy);
- :mod:`.fusion`: BatchNorm folding, fused ResNet blocks, Winograd convolutions, FPN and RPN head;
- :mod:`.poolers`, :mod:`.roi_heads`: RoIAlign as row gathers, the box branch in chunks.

The stage converters (``use_*``, :func:`~.fusion.fold_batchnorm`) change the module they are given
in place; :func:`fast_inference_copy` applies them only to its own deep copy. Measured speed-ups (and
the machine they came from) are in benchmarks/README.md.
"""
from __future__ import annotations

import copy

import torch

from ..mask_rcnn import MaskRCNN
from .fusion import fold_batchnorm, use_fused_residual_blocks, use_inference_fpn_and_rpn_head, use_winograd_convolutions
from .kernels import FastPathFallbackWarning, warn_if_missing
from .roi_heads import use_gather_pooling


def fast_inference_copy(model: MaskRCNN) -> MaskRCNN:
    """A new eval-mode copy of ``model`` with each stage in the form that is fastest on CPU; ``model`` is unchanged.

    - ResNet body: BatchNorm folded, channels-last weights (oneDNN's direct kernels run its 1x1 and
      strided convolutions faster in NHWC), each block's ReLUs and residual sum inside its
      convolutions, the sum written over the block's input where nothing else reads it
      (:class:`~.fusion.InferenceBottleneck`);
    - FPN, RPN head and mask head: Winograd 3x3 convolutions (NNPACK, NCHW) on their large maps and
      on many RoIs, oneDNN on the small levels and a few RoIs (:meth:`~.fusion.WinogradConv2d.path`).
      They stay out of the body: switching layout around every bottleneck costs more than Winograd saves;
    - FPN laterals: 1x1 convolutions as matrix products that read the channels-last body maps and
      write NCHW, top-down sums in place (:class:`~.fusion.InferenceFPN`); RPN objectness and deltas
      as one product per level (:class:`~.fusion.InferenceRPNHead`);
    - RoI heads: RoIAlign as weighted row gathers from one channels-last table of the levels, shared
      by the box and mask poolers, the box branch in chunks of 256 RoIs (:class:`~.roi_heads.InferenceRoIHeads`).

    Args:
        model: a :class:`~models.mask_net.MaskRCNN` (any mode, device and preset).

    Returns:
        A new :class:`~models.mask_net.MaskRCNN` in eval mode sharing no tensor with ``model``.
    """
    warn_if_missing()
    fast = fold_batchnorm(copy.deepcopy(model).eval())
    fast.backbone.body.to(memory_format=torch.channels_last)
    use_fused_residual_blocks(fast.backbone.body)
    use_inference_fpn_and_rpn_head(fast)
    use_gather_pooling(fast.roi_heads)
    for stage in (fast.backbone.fpn, fast.rpn, fast.roi_heads):
        use_winograd_convolutions(stage)
    return fast


__all__ = ["FastPathFallbackWarning", "fast_inference_copy"]
