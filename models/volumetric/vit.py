"""What the two ViT tasks share (ssl_pretrain's ViTAutoEnc, organ_seg's UNETR): patch size, size checks, ROI rule."""
from __future__ import annotations

from typing import Sequence

from models.volumetric.config import VolumeConfig

PATCH_SIZE = 16


def check_vit_sizes(img_size: Sequence[int], *, hidden_size: int, num_heads: int, mlp_dim: int,
                    dropout_rate: float) -> tuple[int, int, int]:
    """Shared checks of the ViT's sizes; returns img_size as a tuple.

    Raises:
        ValueError: naming the size the ViT cannot take.
    """
    img_size = tuple(int(s) for s in img_size)
    if len(img_size) != 3 or any(s < PATCH_SIZE or s % PATCH_SIZE for s in img_size):
        raise ValueError(f"img_size must be three multiples of the patch size {PATCH_SIZE}, got {img_size}")
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size must be a multiple of num_heads, got {hidden_size} and {num_heads}")
    if mlp_dim < 1 or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"need mlp_dim >= 1 and dropout_rate in [0, 1), got {mlp_dim} and {dropout_rate}")
    return img_size


def img_size_from_roi(config: VolumeConfig) -> dict:
    """A ViT's input size is the ROI: ``{"img_size": roi_size}`` for the builder (``Task.network_for_config``)."""
    return {"img_size": list(config.roi_size)}
