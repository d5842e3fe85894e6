"""COVID-CT-Mask-Net's detection stack, one file per stage.

transform -> backbone (+FPN) -> anchors / RPN -> RoI heads (box head, mask head) -> postprocess,
wired by :class:`MaskRCNN` and built by :func:`maskrcnn_resnet_fpn`. The CPU fast path (an
inference-only copy of a model) is apart from it, in :mod:`models.mask_net.fast`.
"""
from .covid_mask_net import CLASSIFIER_BUILDER, SEGMENTATION_BUILDER, CovidMaskNet, covid_mask_net
from .mask_rcnn import COVID_DEFAULTS, TORCHVISION_DEFAULTS, MaskRCNN, maskrcnn_resnet_fpn

__all__ = ["CLASSIFIER_BUILDER", "COVID_DEFAULTS", "SEGMENTATION_BUILDER", "TORCHVISION_DEFAULTS", "CovidMaskNet",
           "MaskRCNN", "covid_mask_net", "maskrcnn_resnet_fpn"]
