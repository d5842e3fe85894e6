"""The volumetric (3D, MONAI) tasks, one module each, looked up by name.

A new task is one module under ``models/volumetric/`` that defines ``TASK`` (a
:class:`models.volumetric.task.Task`, whose fields hold everything the task does differently) plus
one line in ``TASK_MODULES``; training, validation, inference and bundle export then accept
``--task <name>`` without further changes. See docs/ARCHITECTURE.md for the module layout.
"""
from __future__ import annotations

import importlib

from models.volumetric.config import SegConfig
from models.volumetric.task import Task

# Task name -> module that defines TASK. Modules are imported on first use.
TASK_MODULES = {
    "lung_seg": "models.volumetric.lung_seg",
    "lesion_seg": "models.volumetric.lesion_seg",
    "covid_cls": "models.volumetric.covid_cls",
    "ssl_pretrain": "models.volumetric.ssl_pretrain",
    "organ_seg": "models.volumetric.organ_seg",
}

__all__ = ["TASK_MODULES", "SegConfig", "Task", "get_task", "task_names"]


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
