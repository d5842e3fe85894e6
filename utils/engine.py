"""Moved: the 2D loops are in ``models.mask_net.workflows.loops``, ``backward_step`` in ``utils.training``.

Kept only while ``models/volumetric/engine.py`` still imports ``backward_step`` from here; delete it
once that import reads ``from utils.training import backward_step``.
"""
from utils.training import backward_step

__all__ = ["backward_step"]
