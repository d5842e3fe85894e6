"""The sliding-window inferer of the volumetric segmentation tasks, restricted to the region that matters.

Windows run over the body's (or the lung region's) bounding box grown to at least one ROI
(:func:`crop_box`, :func:`window_region`) with MONAI's ``SlidingWindowInferer``; the rest of the
volume is background. :func:`bundle_crop_entries` writes the same region selection for a MONAI
bundle's ``inference.json``; the two are kept side by side so that they change together.
"""
from __future__ import annotations

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from scipy import ndimage

from models.volumetric.config import SegConfig, hu_to_unit
from utils.amp import autocast

# Windows [B, 1, x, y, z] are handed to the network channels-last: about 2x faster 3D convolutions
# on CPU when the weights are channels-last too (see prepare_for_inference).
CHANNELS_LAST = torch.channels_last_3d
# Neighbours within one axial slice (4-connected), for hole filling and dilation slice by slice.
IN_PLANE = np.pad(ndimage.generate_binary_structure(2, 1)[:, :, None], ((0, 0), (0, 0), (1, 1)))


def sliding_window_inferer(config: SegConfig) -> SlidingWindowInferer:
    """MONAI sliding-window inferer with the task's ROI, overlap and blending."""
    return SlidingWindowInferer(roi_size=config.roi_size, sw_batch_size=config.sw_batch_size,
                                overlap=config.overlap, mode=config.blend_mode)


def prepare_for_inference(model: torch.nn.Module, *, device: torch.device) -> torch.nn.Module:
    """Eval mode on ``device`` with channels-last 3D weights (faster convolutions on CPU and CUDA)."""
    return model.eval().to(device=device, memory_format=torch.channels_last_3d)


def crop_box(image: torch.Tensor, *, config: SegConfig) -> tuple[slice, slice, slice] | None:
    """Bounding box of the region the windows need to cover (``config.crop_region``).

    Args:
        image: Float[1, X, Y, Z] pre-processed image (windowed to [0, 1]).
        config: ``crop_region``, ``body_threshold_hu`` and ``crop_margin``.

    Returns:
        One slice per spatial axis, grown by ``crop_margin`` and clipped to the volume; None for
        the whole volume (``"none"``, or nothing found).
    """
    if config.crop_region == "none":
        return None
    body = (image[0] > hu_to_unit(config, config.body_threshold_hu)).cpu().numpy()
    region = _enclosed_dark(body) if config.crop_region == "lung" else body
    return bounding_box(region, margin=config.crop_margin)


def bounding_box(mask: np.ndarray, *, margin: int) -> tuple[slice, slice, slice] | None:
    """Slices of the box around the True voxels of Bool[X, Y, Z], grown by ``margin`` (None if empty)."""
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def window_region(box: tuple[slice, slice, slice] | None, shape, roi_size) -> tuple[slice, slice, slice]:
    """The part of the volume the sliding windows run over: ``box`` grown to at least the ROI.

    Along an axis where ``box`` is shorter than the ROI it is grown about its centre (shifted to
    stay inside the volume) to the ROI, or to the whole axis when the volume is shorter. The number
    of windows is the same, but each window holds the image around the box, as it does when the
    whole volume is segmented, instead of zero padding; the networks' outputs depend on that context
    (GroupNorm statistics, receptive field), so this keeps the box's result close to the whole
    volume's.

    Args:
        box: one slice per axis with explicit bounds (from :func:`crop_box`), or None for everything.
        shape: (X, Y, Z) of the volume.
        roi_size: sliding-window size (x, y, z).

    Returns:
        One slice per axis.
    """
    if box is None:
        return tuple(slice(0, n) for n in shape)
    region = []
    for axis, n, roi in zip(box, shape, roi_size):
        start, stop = axis.start, axis.stop
        if stop - start < roi:
            start = 0 if n <= roi else min(max(start - (roi - (stop - start)) // 2, 0), n - roi)
            stop = min(start + roi, n)
        region.append(slice(start, stop))
    return tuple(region)


def fill_in_plane(mask: np.ndarray) -> np.ndarray:
    """Bool[X, Y, Z] ``mask`` with what it encloses in each axial slice (holes filled slice by slice)."""
    return ndimage.binary_fill_holes(mask, structure=IN_PLANE)


def _enclosed_dark(body: np.ndarray) -> np.ndarray:
    """Voxels below the body threshold that the body outline encloses in their axial slice."""
    return fill_in_plane(body) & ~body


def window_logits(model: torch.nn.Module, image: torch.Tensor, *, config: SegConfig, device: torch.device,
                  amp: bool = False) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Sliding-window logits of one pre-processed volume over the region the windows cover.

    Args:
        model: network in eval mode on ``device`` (best via :func:`prepare_for_inference`),
            logits Float[B, C, x, y, z].
        image: Float[1, X, Y, Z] in [0, 1] on the task's working grid.
        config: ROI, overlap, batch of windows and the region the windows cover.
        device: where the windows run.
        amp: run the network under :func:`utils.amp.autocast` (bfloat16, or float16 on GPUs without it).

    Returns:
        Logits Float[C, x, y, z] on ``device`` and the region, one slice per axis of ``image``'s grid
        (:func:`window_region` of :func:`crop_box`).
    """
    box = window_region(crop_box(image, config=config), image.shape[1:], config.roi_size)
    region = image.as_tensor() if hasattr(image, "as_tensor") else image
    region = region[(slice(None), *box)][None].to(device)  # [1, 1, x, y, z]
    inferer = sliding_window_inferer(config)
    layout = CHANNELS_LAST if _has_channels_last_weights(model) else torch.contiguous_format
    with torch.inference_mode(), autocast(device, amp):
        logits = inferer(region, lambda windows: model(windows.contiguous(memory_format=layout)))
    return logits[0], box


def segment_probabilities(model: torch.nn.Module, image: torch.Tensor, *, config: SegConfig, device: torch.device,
                          amp: bool = False) -> torch.Tensor:
    """Class probabilities (softmax of :func:`window_logits`, same arguments) of one pre-processed volume.

    Returns:
        Float[C, X, Y, Z] on the CPU, on ``image``'s grid; outside the windows' region every class
        has 0 and the argmax is the background, as where a MONAI bundle pads its cropped prediction back.
    """
    logits, box = window_logits(model, image, config=config, device=device, amp=amp)
    probs = torch.zeros((logits.shape[0], *image.shape[1:]), dtype=torch.float32)
    probs[(slice(None), *box)] = logits.float().softmax(dim=0).cpu()
    return probs


def segment(model: torch.nn.Module, image: torch.Tensor, *, config: SegConfig, device: torch.device,
            amp: bool = False) -> torch.Tensor:
    """Sliding-window segmentation of one pre-processed volume on its working grid (the argmax of
    :func:`window_logits`, same arguments): UInt8[1, X, Y, Z], background outside the windows' region."""
    logits, box = window_logits(model, image, config=config, device=device, amp=amp)
    labels = torch.zeros((1, *image.shape[1:]), dtype=torch.uint8)
    labels[(slice(None), *box)] = logits.argmax(dim=0).to("cpu", torch.uint8)
    return labels


def bundle_crop_entries(config: SegConfig) -> tuple[dict, list[str]]:
    """``crop_select`` (a mask of the windows' region) and the imports it needs.

    The bundle's form of :func:`crop_box` and :func:`window_region`, kept beside them:
    ``region_select`` is the body (the windowed image above the body threshold) or the lung region
    (the darker voxels that the body outline encloses in their axial slice), the whole volume when
    empty; its bounding box grows by the margin, then to at least the ROI inside the volume.
    """
    if config.crop_region == "none":
        return {}, []
    entries = {"body_threshold": hu_to_unit(config, config.body_threshold_hu), "crop_margin": config.crop_margin,
               "roi_size": list(config.roi_size)}
    whole_if_empty = "(lambda r: r if bool(r.any()) else torch.ones_like(r))"
    if config.crop_region == "body":
        entries["region_select"] = f"$lambda x: {whole_if_empty}(x > @body_threshold)"
        imports = []
    else:
        entries["in_plane_structure"] = ("$numpy.pad(ndimage.generate_binary_structure(2, 1)[:, :, None], "
                                         "((0, 0), (0, 0), (1, 1)))")
        entries["lung_region"] = "$lambda body: ndimage.binary_fill_holes(body, structure=@in_plane_structure) & ~body"
        entries["region_select"] = (f"$lambda x: {whole_if_empty}(torch.as_tensor("
                                    "@lung_region((x[0] > @body_threshold).cpu().numpy()))[None])")
        imports = ["$from scipy import ndimage"]
    # (start, stop) of one axis grown to the ROI about its centre, inside an axis of n voxels.
    entries["grow_to_roi"] = ("$lambda a, b, n, w: (a, b) if b - a >= w else (0, n) if n <= w else "
                              "(lambda s: (s, s + w))(min(max(a - (w - b + a) // 2, 0), n - w))")
    entries["box_mask"] = ("$lambda box, shape: torch.nn.functional.pad(torch.ones([b - a for a, b in box], "
                           "dtype=torch.uint8), [p for (a, b), n in zip(box[::-1], shape[::-1]) for p in (a, n - b)]"
                           ")[None] > 0")
    entries["crop_select"] = ("$lambda x: (lambda r: @box_mask([@grow_to_roi(a, b, n, w) for a, b, n, w in zip("
                              "*monai.transforms.utils.generate_spatial_bounding_box(r, margin=@crop_margin), "
                              "r.shape[1:], @roi_size)], r.shape[1:]))(@region_select(x))")
    return entries, imports


def _has_channels_last_weights(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.ndim == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1), None)
    return weight is not None and weight.is_contiguous(memory_format=CHANNELS_LAST) and not weight.is_contiguous()
