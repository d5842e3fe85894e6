"""The project's one mixed-precision policy: every trainer and every inference script use it.

``--amp`` on a script turns it on; the precision then follows the device:

- CUDA: bfloat16 where the GPU supports it (Ampere and later), otherwise float16 with a
  :class:`torch.amp.GradScaler` for training (float16 gradients underflow without loss scaling);
- CPU: bfloat16 (no scaler: bfloat16 has float32's exponent range).

Without ``--amp`` everything runs in float32. A training checkpoint records the choice (``args``
has ``amp``; ``precision`` is what it resolved to) and, when a scaler is used, its state under
``scaler``, which a resumed run restores. At inference :func:`for_inference` runs a model under
autocast and hands back float32 outputs, so what the scripts write does not change with ``--amp``.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision(device: torch.device, amp: bool) -> str:
    """``"fp32"`` without ``amp``; with it ``"bf16"`` on CPU and on CUDA GPUs that support it, else ``"fp16"``."""
    if not amp:
        return "fp32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def autocast(device: torch.device, amp: bool):
    """The autocast context of :func:`precision` (a no-op for float32)."""
    name = precision(device, amp)
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[name])


class AutocastInference(torch.nn.Module):
    """``module`` called under autocast, its floating-point outputs (in nested dicts, lists and tuples)
    returned in float32; other attributes are ``module``'s."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return _float32(self.module(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def _float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(v) for v in out)
    return out


def for_inference(module: torch.nn.Module, device: torch.device, amp: bool) -> torch.nn.Module:
    """``module`` itself without ``amp``; with it an :class:`AutocastInference` in :func:`precision`."""
    name = precision(device, amp)
    return module if name == "fp32" else AutocastInference(module, device.type, PRECISIONS[name])


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler | None:
    """A GradScaler when training runs in float16, else None."""
    return torch.amp.GradScaler(device.type) if precision(device, amp) == "fp16" else None


def checkpoint_entries(scaler: torch.amp.GradScaler | None, precision_name: str) -> dict:
    """What a training checkpoint records: ``precision`` and the ``scaler`` state (None without one)."""
    return {"precision": precision_name, "scaler": scaler.state_dict() if scaler is not None else None}


def restore_scaler(scaler: torch.amp.GradScaler | None, checkpoint: dict, path: str) -> None:
    """Load the checkpoint's ``scaler`` state into ``scaler`` (nothing to do when either is absent).

    A float16 run resumed without ``--amp`` (or on a bfloat16 device) drops the saved scale; one
    resumed with ``--amp`` from a checkpoint without a scaler starts a fresh scale. Both are printed.
    """
    saved = checkpoint.get("scaler")
    if scaler is not None and saved:
        scaler.load_state_dict(saved)
    elif scaler is not None:
        print(f"{path}: no saved loss scale, starting a fresh one")
    elif saved:
        print(f"{path}: its loss scale is not used (no float16 training now)")
