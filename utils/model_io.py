"""Rebuild a trained 2D model from its checkpoint, with the command line's inference settings.

Model settings come from the checkpoint; a flag the user gives overrides a threshold, and a flag that
contradicts the architecture stored in the checkpoint is an error naming both values.
"""
from __future__ import annotations

import torch

from utils.checkpoint import build_model_from_checkpoint, load_checkpoint

# Command-line flag -> builder keyword of models.mask_net.maskrcnn_resnet_fpn.
THRESHOLD_FLAGS = {"rpn_nms_th": "rpn_nms_thresh", "roi_nms_th": "box_nms_thresh",
                   "confidence_th": "box_score_thresh"}
ARCHITECTURE_FLAGS = ("backbone_name", "truncation")


def load_model_for_inference(path: str, *, device: torch.device, flags: dict) -> tuple[torch.nn.Module, dict]:
    """Load ``path`` and build its model in eval mode on ``device``.

    Args:
        path: a checkpoint in the project's schema.
        device: target device.
        flags: parsed flags; ``None`` values mean "take it from the checkpoint". Keys among
            ``THRESHOLD_FLAGS`` override builder settings; ``backbone_name``, ``truncation`` and
            ``mask_type`` are checked against the checkpoint.

    Returns:
        The model and the checkpoint dict.

    Raises:
        ValueError: when a flag contradicts the checkpoint's architecture.
    """
    ckpt = load_checkpoint(path)
    _check_architecture(path, ckpt, flags)
    overrides = {kw: flags[flag] for flag, kw in THRESHOLD_FLAGS.items() if flags.get(flag) is not None}
    model = build_model_from_checkpoint(ckpt, **overrides)
    return model.eval().to(device), ckpt


def _check_architecture(path: str, ckpt: dict, flags: dict) -> None:
    stored = {**ckpt["builder_kwargs"], "mask_type": ckpt.get("mask_type")}
    for key in (*ARCHITECTURE_FLAGS, "mask_type"):
        given = flags.get(key)
        if given is not None and stored.get(key) is not None and given != stored[key]:
            raise ValueError(f"--{key} {given} contradicts the checkpoint {path}, which was trained with "
                             f"{key}={stored[key]}; drop the flag or pass the matching checkpoint")
