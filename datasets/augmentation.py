"""Training augmentation of CNCB slices: horizontal flip, small scale jitter, intensity jitter.

Each op takes and returns ``(image, target)`` as :class:`datasets.segmentation.CNCBSegmentationDataset`
gives them: image FloatTensor[3, H, W] in [0, 1]; target ``boxes`` Float32[N, 4] xyxy pixels
(x2 = last column + 1), ``labels`` Int64[N], ``masks`` UInt8[N, H, W] in {0, 1}, and optionally
``area`` Float32[N], ``iscrowd`` Int64[N], ``image_id``. N may be 0. The geometric ops move masks
and recompute the boxes (and areas) from the moved masks, so every box stays the tight box of its
mask; an instance whose mask vanished is dropped with its label. Image size never changes.

No vertical flip: the body is roughly left-right symmetric, not top-bottom. Randomness comes only
from torch's global generator (seeded per epoch by the trainers), so a seeded run repeats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Per-instance target entries (first dimension N) that follow their masks when instances are dropped.
PER_INSTANCE_KEYS = ("labels", "area", "iscrowd")


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of masks, in the dataset's convention (x2 = last column + 1).

    Args:
        masks: UInt8 or Bool[N, H, W]; each mask non-empty.

    Returns:
        Float32[N, 4] xyxy pixels.
    """
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.bool().any(dim=2), masks.bool().any(dim=1)  # [N, H], [N, W]
    y1, x1 = rows.int().argmax(dim=1), cols.int().argmax(dim=1)
    y2 = rows.shape[1] - rows.flip(1).int().argmax(dim=1)
    x2 = cols.shape[1] - cols.flip(1).int().argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror left-right: image and masks flipped, boxes ``x -> W - x`` (exact; its own inverse)."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def zoom(image: torch.Tensor, target: dict[str, torch.Tensor],
         factor: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scale the content by ``factor`` about the image centre on the same H x W canvas.

    The image is resized bilinearly, the masks by nearest neighbour (``nearest-exact``, the same
    pixel-centre convention), then both are centre-cropped (``factor > 1``) or zero-padded
    (``factor < 1``, black as air) back to H x W. The model resizes every image to a fixed short
    side, so a zoom on a fixed canvas (not a plain resize) is what changes the lesions' apparent size.

    Args:
        image: FloatTensor[3, H, W] in [0, 1].
        target: the slice's target dict (see the module docstring).
        factor: scale, > 0.

    Returns:
        The zoomed image (FloatTensor[3, H, W] in [0, 1]) and target; boxes and areas recomputed from
        the masks, instances whose mask vanished dropped.
    """
    height, width = image.shape[-2:]
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    masks = target["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0].to(masks.dtype)
    else:
        masks = masks.new_zeros((0, *size))
    image = _fit_canvas(resized, height, width).clamp_(0.0, 1.0)
    return image, retarget(target, _fit_canvas(masks, height, width))


def _fit_canvas(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop or zero-pad the last two dimensions of ``tensor`` to ``height`` x ``width``."""
    top, left = (tensor.shape[-2] - height) // 2, (tensor.shape[-1] - width) // 2
    # Negative padding crops; F.pad takes (left, right, top, bottom) for the last two dimensions.
    pads = (-left, left + width - tensor.shape[-1], -top, top + height - tensor.shape[-2])
    return F.pad(tensor, pads)


def retarget(target: dict[str, torch.Tensor], masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The target of moved ``masks`` (UInt8[N, H, W]): empty instances dropped, boxes and areas recomputed."""
    keep = masks.flatten(1).bool().any(dim=1)
    masks = masks[keep]
    out = {**target, "masks": masks, "boxes": tight_boxes(masks)}
    for key in PER_INSTANCE_KEYS:
        if key in target:
            out[key] = target[key][keep]
    if "area" in target:
        out["area"] = masks.flatten(1).sum(dim=1).float()
    return out


def intensity(image: torch.Tensor, *, brightness: float, contrast: float) -> torch.Tensor:
    """``(image - mean) * (1 + contrast) + mean + brightness``, clamped to [0, 1].

    Args:
        image: FloatTensor[3, H, W] in [0, 1]; the same change on every channel (gray stays gray).
        brightness: additive shift, in image units.
        contrast: relative change of the contrast about the image mean (0 keeps it), > -1.

    Returns:
        FloatTensor[3, H, W] in [0, 1].
    """
    mean = image.mean()
    return ((image - mean) * (1.0 + contrast) + mean + brightness).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class SliceAugmentation:
    """Random flip, zoom and intensity jitter of a training slice: ``augment(image, target)``.

    Every call draws, in this order and always all four: flip (``torch.rand() < hflip_p``), zoom factor
    ``U(scale_range)``, brightness ``U(-brightness, brightness)``, contrast ``U(-contrast, contrast)``;
    so the same torch seed gives the same output. Pass it as ``transforms=`` of
    :class:`datasets.segmentation.CNCBSegmentationDataset` for the training set only.

    Args:
        hflip_p: probability of a horizontal flip, in [0, 1].
        scale_range: (low, high) of the zoom factor, 0 < low <= high; (1, 1) turns zoom off.
        brightness: largest brightness shift, in [0, 1).
        contrast: largest relative contrast change, in [0, 1).

    Raises:
        ValueError: a setting out of its range, named with the value got.
    """

    hflip_p: float = 0.5
    scale_range: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self):
        low, high = self.scale_range
        checks = {"hflip_p": 0.0 <= self.hflip_p <= 1.0, "scale_range": 0.0 < low <= high,
                  "brightness": 0.0 <= self.brightness < 1.0, "contrast": 0.0 <= self.contrast < 1.0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]} out of range, got {getattr(self, bad[0])!r} (hflip_p in [0, 1], "
                             "scale_range 0 < low <= high, brightness and contrast in [0, 1))")

    def __call__(self, image: torch.Tensor,
                 target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augment one slice (contract in the module docstring); inputs are not modified."""
        flip, factor, shift, gain = self.draw()
        if flip:
            image, target = hflip(image, target)
        if factor != 1.0:
            image, target = zoom(image, target, factor)
        return intensity(image, brightness=shift, contrast=gain), target

    def draw(self) -> tuple[bool, float, float, float]:
        """The random parameters of one call: flip, zoom factor, brightness shift, contrast change."""
        u = torch.rand(4, dtype=torch.float64).tolist()
        low, high = self.scale_range
        return (u[0] < self.hflip_p, low + (high - low) * u[1],
                self.brightness * (2 * u[2] - 1), self.contrast * (2 * u[3] - 1))
