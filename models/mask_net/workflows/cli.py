"""The 2D scripts' model flags, declared once: the Mask R-CNN and classifier S settings.

Each flag has one name everywhere (the command line, the pipeline configs and the settings dicts of
:mod:`models.mask_net.workflows.model_io`). Generic flags (device, seed, run directory, optimiser)
live in :mod:`utils.cli`.
"""
from __future__ import annotations

import argparse

from datasets.conventions import MASK_TYPE_LABELS
from utils.cli import add_amp_arg, positive_int, probability

BACKBONES = ("resnet18", "resnet34", "resnet50")
# The model flags of the 2D scripts, declared once: name -> (argparse keywords, help without its default).
MODEL_FLAGS = {
    "backbone_name": ({"choices": BACKBONES}, "ResNet backbone"),
    "truncation": ({"type": int, "choices": [0, 1, 2]},
                   "ResNet18/34: 0 full, 1 without layer4, 2 without layer3 and layer4; resnet50 takes 0"),
    "num_classes": ({"type": int, "choices": [2, 3], "aliases": ["--num_class"]},
                    "classes of the segmentation model incl. background: 2 merge/ggo, 3 both"),
    "mask_type": ({"choices": sorted(MASK_TYPE_LABELS)},
                  "lesion classes: both = GGO and consolidation as 2 classes, ggo = GGO only, merge = one class"),
    "roi_batch_size": ({"type": positive_int}, "B, the ranked detections per slice that S reads"),
    "s_features": ({"type": positive_int}, "hidden width of S"),
    "score_columns": ({"choices": ["shared", "per_class"]},
                      "what a row of S holds: shared = [score, 4 box deltas] as the original, the class unsaid; "
                      "per_class = one score column per lesion class, the score in its class's column"),
    "rpn_nms_th": ({"type": probability}, "RPN NMS IoU threshold, train and test"),
    "roi_nms_th": ({"type": probability}, "per-class NMS IoU threshold of the RoI detections"),
    "confidence_th": ({"type": probability}, "lowest detection score kept"),
    "mask_overlap_th": ({"type": probability},
                        "a detection with more than this fraction of its mask inside the mask of a better-scored "
                        "detection (any class) is dropped; 1 keeps all"),
    "image_size": ({"type": positive_int}, "short side the model resizes slices to; the long side is capped at 2x"),
    "rpn_fg_iou_th": ({"type": probability}, "IoU from which an anchor is a positive RPN training sample"),
    "rpn_bg_iou_th": ({"type": probability}, "IoU below which an anchor is a negative RPN training sample"),
    "roi_fg_iou_th": ({"type": probability}, "IoU from which a proposal is a positive RoI training sample"),
    "roi_bg_iou_th": ({"type": probability}, "IoU below which a proposal is a background RoI training sample"),
    "roi_samples": ({"type": positive_int}, "RoIs sampled per image to train the box and mask heads"),
    "fpn_channels": ({"type": positive_int}, "channels of the FPN levels, the RPN head and the RoI features"),
    "anchor_sizes": ({"type": positive_int, "nargs": "+"},
                     "anchor sizes in input pixels, used on every FPN level (each combined with every aspect ratio)"),
}
# Flags of train_segmentation.py set by its preset: the anchor and RoI matching and sampling, the FPN's width
# and the mask-overlap suppression (stored in the checkpoint's builder kwargs).
SAMPLING_FLAGS = ("rpn_fg_iou_th", "rpn_bg_iou_th", "roi_fg_iou_th", "roi_bg_iou_th", "roi_samples", "anchor_sizes",
                  "fpn_channels", "mask_overlap_th")
SEGMENTATION_INFERENCE_FLAGS = ("backbone_name", "truncation", "mask_type", "rpn_nms_th", "roi_nms_th", "confidence_th",
                                "mask_overlap_th")
CLASSIFIER_FLAGS = ("backbone_name", "truncation", "num_classes", "roi_batch_size", "s_features", "score_columns",
                    "rpn_nms_th", "roi_nms_th")


def add_model_args(parser: argparse.ArgumentParser, *, names: tuple[str, ...], defaults: dict | None = None,
                   unset: str = "from the checkpoint") -> None:
    """The 2D model flags ``names`` (keys of :data:`MODEL_FLAGS`), in one argument group.

    Args:
        parser: the script's parser.
        names: the flags to add.
        defaults: flag -> default; a flag without one defaults to None, shown in its help as ``unset``.
        unset: what None means, for the help text (default: "from the checkpoint"; an architecture flag
            given with a checkpoint must match it).
    """
    group = parser.add_argument_group("model")
    for name in names:
        options, text = MODEL_FLAGS[name]
        options = dict(options)
        aliases = options.pop("aliases", [])
        default = (defaults or {}).get(name)
        shown = unset if default is None else default
        group.add_argument(f"--{name}", *aliases, dest=name, default=default, help=f"{text} (default: {shown})",
                           **options)


def add_segmentation_inference_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the scripts that run a trained segmentation model: its settings, mask threshold, --unfused, --amp."""
    add_model_args(parser, names=SEGMENTATION_INFERENCE_FLAGS)
    parser.add_argument("--mask_logits_th", type=probability, default=0.5,
                        help="mask probability above which a pixel is lesion (default: 0.5)")
    parser.add_argument("--unfused", action="store_true",
                        help="run the model as trained instead of its fast inference copy (BatchNorm folded, faster "
                             "CPU kernels; same detections up to float rounding, about 1e-5; --amp implies it) "
                             "(default: fast copy)")
    add_amp_arg(parser, inference=True)
