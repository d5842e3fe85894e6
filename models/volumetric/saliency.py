"""GradCAM / GradCAM++ saliency for the one-logit COVID-19 classifier (MONAI's DenseNet121).

Target layer. MONAI's ``DenseNet121`` ends its ``features`` stage with ``norm5`` (a BatchNorm, no
activation); the rectification follows as the first module of the head,
``class_layers = (relu, pool, flatten, out)``. ``class_layers.relu`` therefore outputs the last
spatial feature map of the network, Float[B, 1024, X/32, Y/32, Z/32], after its final norm and
non-linearity and right before global average pooling: the layer GradCAM prescribes (the last
convolutional feature map, whose gradients are the linear weights spread over the grid, so the map
reduces to the class activation map of the trained head). ``features.denseblock4`` would be
before ``norm5`` and ``features.norm5`` before the ReLU, i.e. features the head never sees as such.

Negative predictions. With a single logit ``z``, ``argmax`` always picks the only output, so plain
GradCAM explains the evidence *for* COVID-19 even when the model predicts the opposite; for a
negative case that evidence is mostly negative and the ReLU leaves the map empty. The model is
therefore read as an equivalent two-class model with logits ``[-z/2, z/2]`` (its softmax is exactly
``[1 - sigmoid(z), sigmoid(z)]``), and the map is computed for the predicted class: the gradient of
``-z/2`` when ``sigmoid(z) < 0.5``. Each map is scaled to [0, 1] by its maximum.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import torch
from monai.visualize import GradCAM, GradCAMpp

from datasets.io import Volume, write_nifti
from utils.plots_volume import display_plane, to_ras  # also selects the Agg backend

TARGET_LAYER = "class_layers.relu"
METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMpp}
_WRAPPED_PREFIX = "model."


class SymmetricLogits(torch.nn.Module):
    """A one-logit binary classifier seen as two classes: logits ``[-z/2, z/2]``.

    Softmax of the pair equals ``[1 - sigmoid(z), sigmoid(z)]``, so the predicted class and its
    probability are unchanged, and both classes have a score whose gradient is not zero.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Float[B, C, X, Y, Z] -> logits Float[B, 2]."""
        z = self.model(x)  # [B, 1]
        if z.shape[1] != 1:
            raise ValueError(f"SymmetricLogits wraps a one-logit model, got {z.shape[1]} logits")
        return torch.cat([-z / 2, z / 2], dim=1)


class SaliencyExplainer:
    """GradCAM or GradCAM++ of a classifier's predicted class at a chosen layer.

    Args:
        model: the classifier (logits Float[B, K]); with K == 1 it is wrapped in
            :class:`SymmetricLogits` so negative predictions get a map too.
        method: ``"gradcam"`` or ``"gradcampp"``.
        target_layer: module name inside ``model`` (default :data:`TARGET_LAYER`).

    Raises:
        ValueError: for an unknown method or a layer that ``model`` does not have.
    """

    def __init__(self, model: torch.nn.Module, *, method: str = "gradcam", target_layer: str = TARGET_LAYER):
        if method not in METHODS:
            raise ValueError(f"saliency method must be one of {sorted(METHODS)}, got {method!r}")
        names = dict(model.named_modules())
        if target_layer not in names:
            raise ValueError(f"target layer {target_layer!r} not found in {type(model).__name__}")
        single_logit = _num_logits(model) == 1
        # A new wrapper starts in training mode; MONAI restores the wrapper's mode after each map,
        # which would switch the wrapped model to training mode (batch statistics) for later calls.
        self.network = SymmetricLogits(model).train(model.training) if single_logit else model
        layer = _WRAPPED_PREFIX + target_layer if single_logit else target_layer
        # The identity postprocessing keeps magnitudes; MONAI's default rescales to (1, 0), i.e. flipped.
        self.cam = METHODS[method](nn_module=self.network, target_layers=layer, postprocessing=lambda m: m)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and predicted classes for a batch, one case at a time.

        Args:
            image: Float[B, C, X, Y, Z] network input.

        Returns:
            (maps Float[B, 1, X, Y, Z] in [0, 1] on ``image``'s grid, classes Int64[B]).
        """
        maps, classes = [], []
        for case in image.split(1):
            with torch.no_grad():
                cls = int(self.network(case).argmax(dim=1))
            raw = self.cam(case, class_idx=cls)  # [1, 1, X, Y, Z], upsampled to the input
            maps.append(scale_to_unit(raw.detach()))
            classes.append(cls)
        return torch.cat(maps), torch.as_tensor(classes)


_EXPLAINERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def explainer_for(model: torch.nn.Module, *, method: str = "gradcam", target_layer: str = TARGET_LAYER
                  ) -> SaliencyExplainer:
    """One :class:`SaliencyExplainer` per model, method and layer (its hooks are registered once)."""
    cache = _EXPLAINERS.setdefault(model, {})
    if (method, target_layer) not in cache:
        cache[(method, target_layer)] = SaliencyExplainer(model, method=method, target_layer=target_layer)
    return cache[(method, target_layer)]


def _num_logits(model: torch.nn.Module) -> int | None:
    """Outputs of the last linear layer (the classifier head), or None without one."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None


def scale_to_unit(saliency: torch.Tensor) -> torch.Tensor:
    """Divide a non-negative map by its maximum (an all-zero map stays zero). Float[...] -> [0, 1]."""
    saliency = saliency.float().clamp_min(0)
    peak = saliency.max()
    return saliency / peak if peak > 0 else saliency


def save_overlay(image_hu: np.ndarray, saliency: np.ndarray, path: str | Path, *, affine: np.ndarray,
                 title: str = "", num_slices: int = 8, hu_window: tuple[float, float] = (-1000.0, 500.0)) -> Path:
    """PNG montage of axial slices with the saliency map overlaid (jet colours, transparent near 0).

    Slices are shown in RAS, radiological convention (patient's right on the picture's left,
    anterior up), whatever the file's orientation, as in :mod:`utils.plots_volume`.

    Args:
        image_hu: Float[X, Y, Z] input intensities in HU.
        saliency: Float[X, Y, Z] in [0, 1] on the same grid.
        path: output PNG.
        affine: 4x4 voxel-to-world matrix of the grid.
        title: figure title (case name, prediction).
        num_slices: axial slices shown, evenly spaced over the slices where the map is non-zero.
        hu_window: display window in HU.
    """
    if image_hu.shape != saliency.shape or image_hu.ndim != 3:
        raise ValueError(f"image {image_hu.shape} and saliency {saliency.shape} must be one 3D grid")
    image_hu, saliency = to_ras(image_hu, affine), to_ras(saliency, affine)
    slices = _overlay_slices(saliency, num_slices)
    fig, axes = plt.subplots(1, len(slices), figsize=(2.2 * len(slices), 2.6), dpi=100, squeeze=False)
    for ax, z in zip(axes[0], slices):
        ax.imshow(display_plane(image_hu[:, :, z]), cmap="gray", vmin=hu_window[0], vmax=hu_window[1])
        heat = np.ma.masked_less_equal(display_plane(saliency[:, :, z]), 0.05)
        ax.imshow(heat, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45)
        ax.set_title(f"z={z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _overlay_slices(saliency: np.ndarray, num_slices: int) -> list[int]:
    hit = np.flatnonzero(saliency.reshape(-1, saliency.shape[2]).max(axis=0) > 0)
    first, last = (int(hit[0]), int(hit[-1])) if hit.size else (0, saliency.shape[2] - 1)
    count = max(1, min(num_slices, last - first + 1))
    return sorted({int(round(z)) for z in np.linspace(first, last, count)})


def save_saliency_outputs(out: dict, folder: str | Path, *, png: bool = True,
                          hu_window: tuple[float, float] = (-1000.0, 500.0)) -> dict[str, str]:
    """Write ``<case>_saliency.nii.gz`` (``datasets.io.write_nifti``, the input's affine) and ``<case>_saliency.png``.

    Args:
        out: a result of :func:`models.volumetric.covid_cls.classify_case` with a saliency map
            (``case``, ``saliency``, ``affine``, ``image``, ``probability``).
        folder: output folder.
        png: also write the overlay montage.
        hu_window: display window of the overlay.

    Returns:
        ``{"saliency": nifti path, "overlay": png path or ""}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{out['case']}_saliency.nii.gz"
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(out["affine"]))
    write_nifti(Volume(np.asarray(out["saliency"], dtype=np.float32), out["affine"], spacing, str(path)), path)
    overlay = ""
    if png:
        title = f"{out['case']}: p(COVID-19) = {out['probability']:.3f}"
        overlay = str(save_overlay(out["image"], out["saliency"], folder / f"{out['case']}_saliency.png",
                                   affine=out["affine"], title=title, hu_window=hu_window))
    return {"saliency": str(path), "overlay": overlay}
