"""The pipeline's steps: the two segmentations, their combination, and the two COVID-19 classifiers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from datasets.conventions import CLASS_COVID, hu_to_png
from models.volumetric.covid_cls import MASK_KEY
from models.volumetric.saliency import save_saliency_outputs
from models.volumetric.segmentation import segment_case
from models.volumetric.sliding_window import IN_PLANE, fill_in_plane
from utils import quantify as q

from .loading import Models

LUNG_SLICE_FRACTION = 0.25  # 2D step: slices with at least this fraction of the largest lung area
LESION_MARGIN_VOXELS = 2  # lesions this close to the lung (in-plane) count as lung
SCAN_CASE = "scan"  # case name of the 3D classifier, which names its saliency files


def segment(name: str, image_path: Path, *, models: Models) -> tuple[np.ndarray, np.ndarray]:
    """Binary mask of a volumetric segmentation model and its affine.

    Args:
        name: ``lung_seg`` or ``lesion_seg``.
        image_path: NIfTI file or DICOM folder of the scan.
        models: the loaded models.

    Returns:
        UInt8[X, Y, Z] mask on the input grid and its Float64[4, 4] affine.
    """
    loaded = models.get(name)
    out = segment_case({"image": str(image_path), "case": image_path.name}, model=loaded.model, task=loaded.task,
                       config=loaded.config, device=models.device, amp=models.amp)
    return (out["mask"] > 0).astype(np.uint8), out["affine"]


def lungs_and_lesions(lung: np.ndarray, lesion: np.ndarray, image_hu: np.ndarray, affine: np.ndarray, *,
                      consolidation_hu: float, body_threshold_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Left/right lung labels and GGO/consolidation labels from the two binary masks.

    Lung voxels count only inside the body: the voxels above ``body_threshold_hu`` with what they
    enclose in their axial slice (:func:`inside_body`). A segmentation network can call the air
    outside the body lung (the demo's lung_seg, trained on small phantom volumes, does so beside the
    chest of a 512 x 512 scan), and such a region would be counted as a lung. When nothing of the
    mask lies inside the body (an outline the scan's field of view cuts open), the mask is kept whole.
    Lesion voxels count when they lie within :data:`LESION_MARGIN_VOXELS` of the lungs' in-plane
    outline (holes filled); the lung mask then takes them in.

    Args:
        lung, lesion: Int[X, Y, Z] binary masks; image_hu: Float[X, Y, Z]; affine: Float64[4, 4] of all three.
        consolidation_hu: lesion voxels at or above this HU are consolidation, below GGO.
        body_threshold_hu: HU above which a voxel is body (the lung model's setting).

    Returns:
        UInt8[X, Y, Z] lungs (:data:`utils.quantify.LUNG_LEFT`/``LUNG_RIGHT``) and UInt8[X, Y, Z]
        lesions (:data:`utils.quantify.LESION_GGO`/``LESION_CONSOLIDATION``).
    """
    inside = (lung > 0) & inside_body(image_hu, body_threshold_hu)
    lung = inside if inside.any() else lung > 0
    hull = fill_in_plane(lung)
    hull = ndimage.binary_dilation(hull, structure=IN_PLANE, iterations=LESION_MARGIN_VOXELS)
    lesion = (lesion > 0) & hull
    lungs = q.split_lungs(lung | lesion, affine)
    return lungs, q.lesion_types(lesion, image_hu, consolidation_min_hu=consolidation_hu)


def inside_body(image_hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Bool[X, Y, Z]: voxels of Float[X, Y, Z] HU above ``threshold_hu`` and what they enclose in their axial slice."""
    return fill_in_plane(image_hu > threshold_hu)


def covid_probability_3d(image_path: Path, lungs_path: Path, *, models: Models, out: Path) -> dict:
    """The 3D classifier's COVID-19 probability and its GradCAM map (written under ``out``).

    Returns:
        ``probability``, ``threshold`` and the saliency files (``saliency``, ``overlay``).
    """
    from models.volumetric.covid_cls import classify_case as classify

    loaded = models.get("covid_cls")
    result = classify({"image": str(image_path), MASK_KEY: str(lungs_path), "case": SCAN_CASE}, model=loaded.model,
                      config=loaded.config, device=models.device, saliency="gradcam")
    files = save_saliency_outputs(result, out, hu_window=loaded.config.hu_window)
    return {"probability": result["probability"], "threshold": loaded.config.threshold, **files}


def lung_slices(lungs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Indices (display order, inferior first) of the slices the 2D classifier reads."""
    from utils.plots_volume import display_slices

    area = (display_slices(lungs > 0, affine)).sum(axis=(1, 2))
    return np.flatnonzero(area >= LUNG_SLICE_FRACTION * area.max()) if area.max() else np.arange(0)


@torch.inference_mode()
def covid_probability_2d(image_hu: np.ndarray, lungs: np.ndarray, affine: np.ndarray, *, models: Models,
                         window: tuple[float, float], batch_size: int) -> dict:
    """COVID-CT-Mask-Net's scan probability: the mean slice softmax over the lung slices.

    Args:
        image_hu: Float[X, Y, Z] HU; lungs: Int[X, Y, Z]; affine: Float64[4, 4] of both.
        models: the loaded models (``mask_net_classifier`` among them).
        window: HU range drawn as grey 0..255, as in the 2D training slices.
        batch_size: slices per forward pass.

    Returns:
        ``probability`` (COVID-19), ``class_probabilities`` (Control, CP, COVID-19), ``slices`` (their
        indices) and ``slice_probabilities`` (COVID-19, per slice).

    Raises:
        ValueError: when the lung mask is empty.
    """
    from utils.plots_volume import display_slices

    picks = lung_slices(lungs, affine)
    if picks.size == 0:
        raise ValueError("2D classifier: the lung mask is empty, so there is no lung slice to classify")
    model, device = models.get("mask_net_classifier").model, models.device
    slices = display_slices(image_hu, affine)[picks]  # [S, rows, cols] HU
    probs = []
    for start in range(0, len(slices), batch_size):
        batch = [torch.from_numpy(hu_to_png(s, window)).float().div_(255).expand(3, -1, -1).to(device)
                 for s in slices[start:start + batch_size]]  # each Float[3, rows, cols] in [0, 1]
        probs.append(torch.softmax(model(batch).double(), dim=1).cpu())
    probs = torch.cat(probs).numpy()  # [S, 3]
    mean = probs.mean(axis=0)
    return {"probability": float(mean[CLASS_COVID]), "class_probabilities": mean.tolist(),
            "slices": picks.tolist(), "slice_probabilities": probs[:, CLASS_COVID].tolist()}
