"""Rebuild a trained 2D model from its checkpoint, with the command line's inference settings.

Model settings come from the checkpoint; a flag the user gives overrides a threshold, and a flag that
contradicts the architecture stored in the checkpoint is an error naming both values.
"""
from __future__ import annotations

from typing import Iterable

import torch

from utils.checkpoint import build_model_from_checkpoint, load_checkpoint

SEGMENTATION_BUILDER = "models.mask_net.maskrcnn_resnet_fpn"  # the 2D segmentation scripts' default
# Command-line flag -> builder keyword of models.mask_net.maskrcnn_resnet_fpn.
THRESHOLD_FLAGS = {"rpn_nms_th": "rpn_nms_thresh", "roi_nms_th": "box_nms_thresh",
                   "confidence_th": "box_score_thresh"}
ARCHITECTURE_FLAGS = ("backbone_name", "truncation", "mask_type")


def load_model_for_inference(path: str, *, device: torch.device, flags: dict, builder: str = SEGMENTATION_BUILDER,
                             kind: str = "segmentation",
                             architecture_flags: Iterable[str] = ARCHITECTURE_FLAGS,
                             threshold_flags: dict[str, str] = THRESHOLD_FLAGS) -> tuple[torch.nn.Module, dict]:
    """Load ``path`` and build its model in eval mode on ``device``.

    Args:
        path: a checkpoint in the project's schema.
        device: target device.
        flags: parsed flags; ``None`` values mean "take it from the checkpoint".
        builder: the builder the checkpoint must name (default: the segmentation model's; the
            classifier's is ``models.mask_net.covid_mask_net``).
        kind: what such a checkpoint is called in the error message.
        architecture_flags: flags checked against the checkpoint's builder kwargs (and ``mask_type``).
        threshold_flags: flag -> builder keyword; a given flag overrides the stored setting.

    Returns:
        The model and the checkpoint dict.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the checkpoint is unreadable, has another builder (checked before anything is
            built, so a checkpoint of the wrong kind never reaches the model code), or a flag
            contradicts its architecture.
    """
    ckpt = load_checkpoint(path, builder=builder, kind=kind)
    stored = {**ckpt["builder_kwargs"], "mask_type": ckpt.get("mask_type")}
    check_architecture(path, stored, flags, architecture_flags)
    overrides = {kw: flags[flag] for flag, kw in threshold_flags.items() if flags.get(flag) is not None}
    model = build_model_from_checkpoint(ckpt, **overrides)
    return model.eval().to(device), ckpt


def check_architecture(path: str, stored: dict, flags: dict, keys: Iterable[str]) -> None:
    """Raise ValueError when a given flag among ``keys`` contradicts the value stored in ``path``."""
    for key in keys:
        given = flags.get(key)
        if given is not None and stored.get(key) is not None and given != stored[key]:
            raise ValueError(f"--{key} {given} contradicts the checkpoint {path}, which was trained with "
                             f"{key}={stored[key]}; drop the flag or pass the matching checkpoint")
