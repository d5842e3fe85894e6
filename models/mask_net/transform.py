"""Input stage: normalise, resize and batch images (and their targets); map detections back.

Images enter as a list of FloatTensor[3, H, W] in [0, 1] of any sizes. Each is normalised with
the ImageNet mean and std, resized so that its short side is ``min_size`` unless that makes the
long side exceed ``max_size``, and zero-padded into one batch whose sides are multiples of 32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .paste import paste_masks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageBatch(NamedTuple):
    """A padded batch and the size of each image inside it.

    Attributes:
        tensors: FloatTensor[B, 3, H_pad, W_pad].
        image_sizes: (height, width) of each resized image before padding.
    """

    tensors: torch.Tensor
    image_sizes: list[tuple[int, int]]


def resize_boxes(boxes: torch.Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> torch.Tensor:
    """Scale xyxy ``boxes`` (FloatTensor[N, 4]) from an image of ``old_size`` (h, w) to ``new_size``."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32, device=boxes.device) / old_size[0]
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32, device=boxes.device) / old_size[1]
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack((x0 * ratio_w, y0 * ratio_h, x1 * ratio_w, y1 * ratio_h), dim=1)


class DetectionTransform(nn.Module):
    """Normalise, resize and batch images; scale detections and paste masks back afterwards.

    Args:
        min_size: target length of the short side.
        max_size: upper bound of the long side.
        image_mean: per-channel mean subtracted from images in [0, 1].
        image_std: per-channel standard deviation.
        size_divisible: the padded batch's sides are multiples of this.
    """

    def __init__(self, *, min_size: int, max_size: int, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                 size_divisible: int = 32) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.size_divisible = size_divisible

    def forward(self, images: list[torch.Tensor],
                targets: list[dict] | None = None) -> tuple[ImageBatch, list[dict] | None]:
        """Prepare ``images`` (list of FloatTensor[3, H, W] in [0, 1]) and optional target dicts."""
        resized, new_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            _check_image(image, i)
            target = dict(targets[i]) if targets is not None else None
            image, target = self._resize(self._normalize(image), target)
            resized.append(image)
            if new_targets is not None:
                new_targets.append(target)
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
        return ImageBatch(self._batch(resized), sizes), new_targets

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def _resize(self, image: torch.Tensor, target: dict | None) -> tuple[torch.Tensor, dict | None]:
        old_size = tuple(image.shape[-2:])
        scale = min(self.min_size / min(old_size), self.max_size / max(old_size))
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if target is None:
            return image, None
        target["boxes"] = resize_boxes(target["boxes"], old_size, tuple(image.shape[-2:]))
        if "masks" in target:
            masks = target["masks"][:, None].float()
            target["masks"] = F.interpolate(masks, scale_factor=scale, recompute_scale_factor=True)[:, 0].byte()
        return image, target

    def _batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        stride = float(self.size_divisible)
        height = int(math.ceil(max(img.shape[-2] for img in images) / stride) * stride)
        width = int(math.ceil(max(img.shape[-1] for img in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for img, slot in zip(images, batch):
            slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch

    def postprocess(self, detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Map boxes to the original image sizes and paste 28x28 mask probabilities into them.

        ``masks`` become FloatTensor[N, 1, H, W] probabilities in [0, 1] at the original size.
        """
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
            if "masks" in det:
                det["masks"] = paste_masks(det["masks"], det["boxes"], original)
        return detections


def _check_image(image: torch.Tensor, index: int) -> None:
    if not torch.is_tensor(image) or image.dim() != 3:
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"image {index} must be a tensor of shape [C, H, W], got {shape}")
    if not image.is_floating_point():
        raise TypeError(f"image {index} must be a floating-point tensor in [0, 1], got dtype {image.dtype}")
