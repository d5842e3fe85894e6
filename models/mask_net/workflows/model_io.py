"""Model settings of the 2D models and the rebuilding of a trained one from its checkpoint.

A model setting has one name everywhere: the command-line flag (``--rpn_nms_th``), the field of a
pipeline's config and the key of the ``settings`` dicts below. :data:`BUILDER_KEYWORDS` is the one
table from these names to the keywords of ``models.mask_net.maskrcnn_resnet_fpn`` and
``covid_mask_net``. When a trained model is rebuilt, its settings come from the checkpoint; a given
inference setting overrides the stored one, and a given architecture setting that contradicts the
checkpoint is an error naming both values.
"""
from __future__ import annotations

import inspect
from typing import Iterable

import torch

from utils.checkpoint import SEGMENTATION_BUILDER, build_model_from_checkpoint, load_checkpoint, resolve_builder

# Model setting -> builder keyword; ``image_size`` sets the short side and caps the long one at 2x.
BUILDER_KEYWORDS = {"backbone_name": "backbone_name", "truncation": "truncation", "num_classes": "num_classes",
                    "roi_batch_size": "roi_batch_size", "s_features": "s_features", "score_columns": "score_columns",
                    "rpn_nms_th": "rpn_nms_thresh",
                    "roi_nms_th": "box_nms_thresh", "confidence_th": "box_score_thresh",
                    "mask_overlap_th": "mask_overlap_thresh",
                    "image_size": ("min_size", "max_size")}
# Settings that fix parameter shapes (and the lesion classes): given ones must match the checkpoint.
ARCHITECTURE_SETTINGS = ("backbone_name", "truncation", "num_classes", "roi_batch_size", "s_features", "score_columns",
                         "mask_type")
# Settings that leave parameter shapes alone: given ones replace the checkpoint's.
INFERENCE_SETTINGS = ("rpn_nms_th", "roi_nms_th", "confidence_th", "mask_overlap_th", "image_size")


def builder_keywords(settings: dict, *, names: Iterable[str] | None = None) -> dict:
    """Builder keywords of the given (not None) model settings.

    Args:
        settings: setting name -> value; None means "not given"; names outside :data:`BUILDER_KEYWORDS`
            (data folders, mask_type, ...) are ignored.
        names: only these settings (default: all).

    Returns:
        Builder keyword -> value, e.g. ``{"rpn_nms_thresh": 0.7, "min_size": 512, "max_size": 1024}``.
    """
    wanted = BUILDER_KEYWORDS.keys() if names is None else names
    out = {}
    for name in wanted:
        value = settings.get(name)
        if value is None:
            continue
        if name == "image_size":
            out.update(min_size=value, max_size=2 * value)
        else:
            out[BUILDER_KEYWORDS[name]] = value
    return out


def load_model_for_inference(path: str, *, device: torch.device, flags: dict, builder: str = SEGMENTATION_BUILDER,
                             kind: str = "segmentation",
                             architecture_flags: Iterable[str] = ARCHITECTURE_SETTINGS) -> tuple[torch.nn.Module, dict]:
    """Load ``path`` and build its model in eval mode on ``device``.

    Args:
        path: a checkpoint in the project's schema.
        device: target device.
        flags: model settings (flag names); ``None`` values mean "take it from the checkpoint".
        builder: the builder the checkpoint must name (default: the segmentation model's; the
            classifier's is ``CLASSIFIER_BUILDER``).
        kind: what such a checkpoint is called in the error message.
        architecture_flags: settings checked against the checkpoint's builder kwargs (and ``mask_type``).

    Returns:
        The model and the checkpoint dict.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the checkpoint is unreadable, has another builder (checked before anything is
            built, so a checkpoint of the wrong kind never reaches the model code), or a flag
            contradicts its architecture.
    """
    ckpt = load_checkpoint(path, builder=builder, kind=kind)
    check_architecture(path, stored_settings(ckpt), flags, architecture_flags)
    model = build_model_from_checkpoint(ckpt, **builder_keywords(flags, names=INFERENCE_SETTINGS))
    return model.eval().to(device), ckpt


def stored_settings(ckpt: dict) -> dict:
    """What the checkpoint's model was built with: its builder's defaults, overridden by the stored
    ``builder_kwargs`` (so an option added after the checkpoint was written reads as the default it was
    built with), and its ``mask_type``."""
    defaults = {name: p.default for name, p in inspect.signature(resolve_builder(ckpt["builder"])).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **ckpt["builder_kwargs"], "mask_type": ckpt.get("mask_type")}


def check_architecture(path: str, stored: dict, flags: dict, keys: Iterable[str] = ARCHITECTURE_SETTINGS) -> None:
    """Raise ValueError when a given flag among ``keys`` contradicts the value stored in ``path``."""
    for key in keys:
        given = flags.get(key)
        if given is not None and stored.get(key) is not None and given != stored[key]:
            raise ValueError(f"--{key} {given} contradicts the checkpoint {path}, which was trained with "
                             f"{key}={stored[key]}; drop the flag or pass the matching checkpoint")
