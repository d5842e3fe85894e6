"""The CPU fast path: an inference-only copy of a Mask R-CNN, kept off the readable model.

``fast_inference_copy(model)`` returns a new, eval-mode model that gives the same detections (up to
float rounding) faster on CPU; ``model`` itself is left unchanged.
"""
from __future__ import annotations

import copy

from torch import nn


def fast_inference_copy(model: nn.Module) -> nn.Module:
    """A new inference-only copy of ``model`` (a :class:`~models.mask_net.MaskRCNN`); ``model`` is unchanged."""
    return copy.deepcopy(model).fuse_for_inference()


__all__ = ["fast_inference_copy"]
