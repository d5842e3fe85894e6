"""The mixed-precision policy of the volumetric track, in one place."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, amp: bool):
    """Mixed precision context: float16 on CUDA, bfloat16 on CPU; a no-op when ``amp`` is off."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
