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
