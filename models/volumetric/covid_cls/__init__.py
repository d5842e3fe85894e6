"""Task ``covid_cls``: COVID-19 classification of the lung region with MONAI's 3D DenseNet121.

Input: a CT volume in HU (``image``) and its lung mask (``label_image``); ``label`` is 1 for COVID-19
and 0 otherwise. Training: one logit, BCE-with-logits, Adam 5e-6; ``checkpoint_best.pth`` has the
best validation ROC AUC (of epochs with equal AUC, the lowest validation log loss). Metrics at a 0.5
probability threshold: accuracy, sensitivity, specificity; and ROC AUC and log loss. The task is split by concern:

- :mod:`.config`: :class:`ClsConfig`, the settings stored in checkpoints.
- :mod:`.model`: the network builder, loss and post-processing.
- :mod:`.transforms`: pre-processing and augmentation (and their bundle form).
- :mod:`.metrics`: :func:`classification_metrics`.
- :mod:`.inference`: one case, validation during training, validation and inference of cases.
- :mod:`.bundle`: how the task is written as a MONAI bundle.
"""
from __future__ import annotations

from models.volumetric.covid_cls.bundle import BUNDLE
from models.volumetric.covid_cls.config import ClsConfig
from models.volumetric.covid_cls.inference import (
    classify_case,
    evaluate,
    infer_cases,
    validate_cases,
    validation_report,
)
from models.volumetric.covid_cls.metrics import classification_metrics
from models.volumetric.covid_cls.model import BinaryLoss, build_network, loss, postprocessing
from models.volumetric.covid_cls.transforms import (
    MASK_KEY,
    CheckLungMaskd,
    LoadLungCased,
    augmentation,
    lung_region_transforms,
    preprocessing,
)
from models.volumetric.task import Task

CLASS_NAMES = ("non-COVID", "COVID-19")

__all__ = ["BinaryLoss", "CLASS_NAMES", "CheckLungMaskd", "ClsConfig", "LoadLungCased", "MASK_KEY", "TASK",
           "augmentation", "build_network", "classification_metrics", "classify_case", "evaluate", "infer_cases",
           "loss", "lung_region_transforms", "postprocessing", "preprocessing", "validate_cases"]

TASK = Task(
    name="covid_cls",
    kind="classification",
    builder="models.volumetric.covid_cls.build_network",
    network_kwargs={"in_channels": 1, "out_channels": 1},
    default_config=ClsConfig(),
    roi_multiple=1,
    preprocessing=preprocessing,
    augmentation=augmentation,
    loss=loss,
    postprocessing=postprocessing,
    default_lr=5e-6,
    class_names=CLASS_NAMES,
    evaluate=evaluate,
    selection_metric=("auc", True),
    # on a dozen validation scans the AUC is 1.0 at several epochs, some of them calling every scan
    # COVID-19 (or none): the lowest log loss, whose probabilities are right, decides
    tie_break=("log_loss", False),
    validate_cases=validate_cases,
    validation_report=validation_report,
    infer_cases=infer_cases,
    uses_lung_model=True,
    bundle=BUNDLE,
)
