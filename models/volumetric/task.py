"""The contract of a volumetric task: one :class:`Task` record, its data and its stages.

A task module (``lung_seg.py``, ``lesion_seg.py``, ...) defines one ``TASK``: its network builder,
pre-processing and augmentation (MONAI dictionary transforms), loss, post-processing, and every
stage where it differs from binary segmentation (training epoch, validation, inference, the metric
that selects ``checkpoint_best.pth``, pre-trained weights it can load, its MONAI bundle). The
library calls these fields and never branches on a task's name; see docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from models.volumetric import segmentation, training
from models.volumetric.config import VolumeConfig
from utils.checkpoint import resolve_builder

if TYPE_CHECKING:
    from models.volumetric.bundle.spec import BundleSpec


def no_network_change(config: VolumeConfig) -> dict:
    """Builder keywords that follow the config: none for networks of any input size."""
    return {}


@dataclass(frozen=True)
class Task:
    """One volumetric task, defined once.

    Attributes:
        name: registry name, e.g. ``"lung_seg"``.
        kind: what the task does, for people (``"segmentation"``, ``"classification"``,
            ``"self_supervised"``); code reads the stage fields instead.
        builder: dotted path of the keyword-only network builder (stored in checkpoints).
        network_kwargs: default builder keyword arguments.
        default_config: default settings, a :class:`models.volumetric.config.VolumeConfig`.
        roi_multiple: every ROI side must be a multiple of this (network down-sampling).
        preprocessing: ``f(config, *, keys) -> list`` of deterministic dictionary transforms.
        augmentation: ``f(config) -> list`` of training transforms (crops and random ones).
        loss: ``f() -> nn.Module`` taking the network's output and the batch's labels.
        postprocessing: ``f(config) -> callable`` on the network's (argmaxed) output.
        default_lr: default Adam learning rate.
        class_names: output class names, background first.
        train_one_epoch: one pass over a loader, signature of
            :func:`models.volumetric.training.train_one_epoch`; returns the mean loss or a dict of terms.
        evaluate: validation metrics of a pre-processed dataset during training, signature of
            :func:`models.volumetric.training.evaluate_dice`.
        selection_metric: ``(name, higher_is_better)`` of the ``evaluate`` result that selects
            ``checkpoint_best.pth``.
        tie_break: ``(name, higher_is_better)`` of the ``evaluate`` result that decides between epochs
            with equal selection values; None: the later epoch.
        validate_cases: metrics of labelled cases on their own grid, signature of
            :func:`models.volumetric.segmentation.validate_cases`.
        validation_report: ``f(rows, summary) -> lines`` printed after validation.
        infer_cases: outputs of unlabelled cases, signature of
            :func:`models.volumetric.segmentation.infer_cases`; None for a task without inference output.
        uses_lung_model: inference reads a lung_seg checkpoint for cases without a lung mask.
        network_for_config: ``f(config) -> dict`` of builder keywords that follow the settings
            (a ViT's ``img_size`` is the ROI).
        pretrained: option name -> ``f(model, path)`` that loads pre-trained weights into the built
            network (e.g. ``pretrained_encoder``).
        bundle: how the task is written as a MONAI bundle; None for a task without one.
    """

    name: str
    kind: str
    builder: str
    network_kwargs: dict
    default_config: VolumeConfig
    roi_multiple: int
    preprocessing: Callable[..., list]
    augmentation: Callable[[Any], list]
    loss: Callable[[], torch.nn.Module]
    postprocessing: Callable[[Any], Callable]
    default_lr: float = 1e-3
    class_names: tuple[str, ...] = field(default=("background", "foreground"))
    train_one_epoch: Callable[..., float | dict] = training.train_one_epoch
    evaluate: Callable[..., dict] = training.evaluate_dice
    selection_metric: tuple[str, bool] = ("dice", True)
    tie_break: tuple[str, bool] | None = None
    validate_cases: Callable[..., tuple[list[dict], dict]] = segmentation.validate_cases
    validation_report: Callable[[list[dict], dict], list[str]] = segmentation.validation_report
    infer_cases: Callable[..., list[dict]] | None = segmentation.infer_cases
    uses_lung_model: bool = False
    network_for_config: Callable[[Any], dict] = no_network_change
    pretrained: dict[str, Callable[[torch.nn.Module, str], Any]] = field(default_factory=dict)
    bundle: BundleSpec | None = None

    def make_config(self, **overrides: Any) -> VolumeConfig:
        """The default config with ``overrides`` (None values ignored), checked against the network.

        Raises:
            ValueError: for a setting the task does not have, or an ROI side that is not a multiple
                of ``roi_multiple``.
        """
        given = {k for k, v in overrides.items() if v is not None}
        unknown = sorted(given - self.default_config.names())
        if unknown:
            raise ValueError(f"{self.name} has no setting {unknown}; its settings are "
                             f"{sorted(self.default_config.names())}")
        config = self.default_config.replace(**overrides)
        bad = [s for s in config.roi_size if s % self.roi_multiple]
        if bad:
            raise ValueError(f"{self.name}: every roi_size side must be a multiple of {self.roi_multiple} "
                             f"for this network, got {list(config.roi_size)}")
        return config

    def build_network(self, **overrides: Any) -> tuple[torch.nn.Module, dict]:
        """Build the network with the default kwargs updated by ``overrides``; returns (model, kwargs)."""
        kwargs = {**self.network_kwargs, **overrides}
        return resolve_builder(self.builder)(**kwargs), kwargs
