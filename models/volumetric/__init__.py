"""The volumetric (3D, MONAI) tasks, one module each, looked up by name.

A new task is one module under ``models/volumetric/`` that defines ``TASK`` (a
:class:`models.volumetric.common.Task`) plus one line in ``TASK_MODULES``; the training,
validation and inference scripts then accept ``--task <name>`` without further changes for the
kinds they support (``Task.kind``).
"""
from __future__ import annotations

import importlib

from models.volumetric.common import SegConfig, Task

# Task name -> module that defines TASK. Modules are imported on first use.
TASK_MODULES = {
    "lung_seg": "models.volumetric.lung_seg",
    "lesion_seg": "models.volumetric.lesion_seg",
    "covid_cls": "models.volumetric.covid_cls",
    "ssl_pretrain": "models.volumetric.ssl_pretrain",
    "organ_seg": "models.volumetric.organ_seg",
}

__all__ = ["TASK_MODULES", "SegConfig", "Task", "get_task", "task_names", "task_stage"]


def task_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_task`."""
    return tuple(TASK_MODULES)


def get_task(name: str) -> Task:
    """The :class:`Task` registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in TASK_MODULES:
        raise ValueError(f"unknown volumetric task {name!r}; choose one of {list(TASK_MODULES)}")
    task = importlib.import_module(TASK_MODULES[name]).TASK
    if task.name != name:
        raise ValueError(f"module {TASK_MODULES[name]} defines task {task.name!r}, registered as {name!r}")
    return task


def task_stage(task: Task, name: str, default):
    """A stage the task's module defines in place of the shared one, else ``default``.

    Tasks of other kinds than binary segmentation replace stages by defining them in their module:
    ``train_one_epoch`` and ``evaluate`` (signatures of :mod:`models.volumetric.engine`),
    ``validate_cases`` and ``predict_case`` (of :mod:`models.volumetric.inference`), and
    ``SELECTION_METRIC = (name, higher_is_better)`` for ``checkpoint_best.pth``.
    """
    return getattr(importlib.import_module(TASK_MODULES[task.name]), name, default)
