"""Moved to :mod:`models.mask_net.fast` (the CPU fast path, off the readable model); these names stay
importable from here for code that has not moved yet. New code: ``from models.mask_net.fast import ...``."""
from .fast.fusion import (
    InferenceBasicBlock,
    InferenceBottleneck,
    InferenceFPN,
    InferenceRPNHead,
    WinogradConv2d,
    add_upsampled_,
    conv1x1,
    fold_batchnorm,
    use_fused_residual_blocks,
    use_inference_fpn_and_rpn_head,
    use_winograd_convolutions,
)
from .fast.roi_heads import ChannelsLastTwoMLPHead, InferenceRoIHeads, use_gather_pooling

__all__ = ["ChannelsLastTwoMLPHead", "InferenceBasicBlock", "InferenceBottleneck", "InferenceFPN", "InferenceRPNHead",
           "InferenceRoIHeads", "WinogradConv2d", "add_upsampled_", "conv1x1", "fold_batchnorm",
           "use_fused_residual_blocks", "use_gather_pooling", "use_inference_fpn_and_rpn_head",
           "use_winograd_convolutions"]
