"""The classifier's loops: one case, validation metrics during training, validation and inference of cases.

:func:`classify_case` classifies one case from its files (and maps its GradCAM saliency back onto
the input's grid); :func:`evaluate` scores the pre-processed validation set during training;
:func:`validate_cases` and :func:`infer_cases` are the task's validation and inference stages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from tqdm import tqdm

from models.volumetric.common import IMAGE_KEY, LABEL_KEY, apply_transform, case_name
from models.volumetric.covid_cls.config import ClsConfig
from models.volumetric.covid_cls.metrics import classification_metrics
from models.volumetric.covid_cls.model import postprocessing
from models.volumetric.covid_cls.transforms import MASK_KEY, preprocessing
from models.volumetric.saliency import TARGET_LAYER, explainer_for, save_saliency_outputs
from models.volumetric.segmentation import save_mask, segment_case
from utils.amp import autocast

SALIENCY_KEY = "saliency"


def classify_case(case: dict, *, model: torch.nn.Module, config: ClsConfig, device: torch.device,
                 saliency: str | None = None, target_layer: str | None = None) -> dict:
    """Classify one case and, optionally, map its GradCAM saliency back onto the input's grid.

    Args:
        case: ``{"image": path, "label_image": lung mask path}``, optionally ``"label"``, ``"case"``.
        model: the classifier in eval mode on ``device`` (logits Float[B, 1]).
        config: the checkpoint's pre-processing settings.
        device: where the network runs.
        saliency: None, ``"gradcam"`` or ``"gradcampp"``.
        target_layer: layer for the saliency map (None: :data:`saliency.TARGET_LAYER`).

    Returns:
        dict with ``case``, ``probability`` (float), ``prediction`` (0/1 at ``config.threshold``),
        ``label`` when known, and with ``saliency``: ``saliency`` Float32[X, Y, Z] in [0, 1] with
        exactly the input's shape, ``affine`` Float64[4, 4] (the input's), ``image`` Float32[X, Y, Z] HU.

    Raises:
        ValueError: naming the case for unreadable or invalid input.
    """
    transforms = preprocessing(config)
    loaded = apply_transform(transforms[0], case)
    rest = Compose(transforms[1:])
    data = apply_transform(rest, dict(loaded))
    image = data[IMAGE_KEY].as_tensor()[None].to(device)  # [1, 1, *roi_size]
    with torch.inference_mode():
        probability = float(postprocessing(config)(model(image))[0])
    out = {"case": case_name(case), "probability": probability, "prediction": int(probability >= config.threshold)}
    if LABEL_KEY in data:
        out[LABEL_KEY] = int(data[LABEL_KEY])
    if saliency:
        out.update(_saliency_on_input_grid(data, rest, loaded[IMAGE_KEY], model=model, image=image,
                                           method=saliency, target_layer=target_layer or TARGET_LAYER))
    return out


def evaluate(model: torch.nn.Module, dataset, *, config: ClsConfig, device: torch.device, amp: bool = False,
             progress: bool = False, **_: Any) -> dict:
    """Metrics of pre-processed validation cases (``image`` Float[1, *roi_size], ``label``).

    Returns:
        :func:`classification_metrics` at ``config.threshold`` plus ``probabilities`` (per case).
    """
    model.eval()
    labels, probabilities = [], []
    for index in tqdm(range(len(dataset)), desc="validate", disable=not progress, leave=False):
        item = apply_transform(dataset.__getitem__, index)
        image = item[IMAGE_KEY].as_tensor()[None].to(device)  # [1, 1, *roi_size]
        with torch.inference_mode(), autocast(device, amp):
            probabilities.append(float(postprocessing(config)(model(image))[0]))
        labels.append(int(item[LABEL_KEY]))
    return {**classification_metrics(labels, probabilities, threshold=config.threshold),
            "probabilities": probabilities}


def validate_cases(cases: list[dict], *, model: torch.nn.Module, task, config: ClsConfig, device: torch.device,
                   progress: bool = True, **_: Any) -> tuple[list[dict], dict]:
    """Classify labelled cases from their files; rows for predictions.csv and the summary (of ``task``).

    Returns:
        (rows with ``case``, ``image``, ``label``, ``probability``, ``prediction``; summary with
        ``task``, ``cases``, ``threshold`` and :func:`classification_metrics`).

    Raises:
        ValueError: naming a case without a numeric ``label``.
    """
    rows = []
    for case in tqdm(cases, desc="validate", disable=not progress):
        if case.get(LABEL_KEY) is None:
            raise ValueError(f"case {case_name(case)}: validation needs a numeric 'label' (0 or 1)")
        out = classify_case(case, model=model, config=config, device=device)
        rows.append({"case": out["case"], "image": case[IMAGE_KEY], "label": out[LABEL_KEY],
                     "probability": round(out["probability"], 6), "prediction": out["prediction"]})
    metrics = classification_metrics([r["label"] for r in rows], [r["probability"] for r in rows],
                                     threshold=config.threshold)
    return rows, {"task": task.name, "cases": len(rows), "threshold": config.threshold, **metrics}


def infer_cases(cases: list[dict], *, model: torch.nn.Module, config: ClsConfig, device: torch.device,
                output: str | Path, saliency: str | None = None, lung_model: tuple | None = None,
                progress: bool = True, **_: Any) -> list[dict]:
    """Classify cases; write saliency maps and, for cases without a lung mask, the lung_seg mask.

    Args:
        cases: dicts with ``image`` and, optionally, ``label_image`` (lung mask) and ``label``.
        model, config, device: the classifier and its settings (see :func:`classify_case`).
        output: folder for ``<case>_saliency.nii.gz``/``.png`` and ``<case>_lung_seg.nii.gz``.
        saliency: None, ``"gradcam"`` or ``"gradcampp"``.
        lung_model: ``(model, task, config)`` of a lung_seg checkpoint (from
            :func:`models.volumetric.inference.load_task_model`) for cases without a lung mask.
        progress: show a progress bar.

    Returns:
        One row per case for predictions.csv: ``case``, ``probability``, ``prediction``, ``label``
        (empty when unknown), ``lung_mask``, ``saliency``, ``overlay`` (paths, empty when not written).

    Raises:
        ValueError: naming a case that has no lung mask when ``lung_model`` is None.
    """
    rows = []
    for case in tqdm(cases, desc="infer", disable=not progress):
        if not case.get(MASK_KEY):
            case = {**case, MASK_KEY: _segment_lungs(case, lung_model, device=device, output=Path(output))}
        out = classify_case(case, model=model, config=config, device=device, saliency=saliency)
        files = save_saliency_outputs(out, output, hu_window=config.hu_window) if saliency else {}
        rows.append({"case": out["case"], "probability": round(out["probability"], 6),
                     "prediction": out["prediction"], "label": out.get(LABEL_KEY, ""), "lung_mask": case[MASK_KEY],
                     "saliency": files.get("saliency", ""), "overlay": files.get("overlay", "")})
    return rows


def validation_report(rows: list[dict], summary: dict) -> list[str]:
    """The line printed after validation: accuracy, AUC, sensitivity and specificity."""
    return [", ".join(f"{k} {summary[k]:.4f}" for k in ("accuracy", "auc", "sensitivity", "specificity"))
            + f" over {summary['cases']} cases"]


def _segment_lungs(case: dict, lung_model: tuple | None, *, device: torch.device, output: Path) -> str:
    """Lung mask of a case from the lung_seg model, written on the input's grid; returns its path."""
    if lung_model is None:
        raise ValueError(f"case {case_name(case)}: no lung mask ('{MASK_KEY}'); give one in dataset.json or a "
                         "lung_seg checkpoint (infer_volumetric.py --lung_ckpt)")
    model, task, config = lung_model
    out = segment_case({IMAGE_KEY: case[IMAGE_KEY], "case": case_name(case)}, model=model, task=task, config=config,
                       device=device)
    return str(save_mask(out["mask"], out["affine"], output / f"{out['case']}_lung_seg.nii.gz"))


def _saliency_on_input_grid(data: dict, transform: Compose, original: torch.Tensor, *, model, image, method,
                            target_layer) -> dict:
    """GradCAM on the network grid, inverted through ``transform`` onto ``original``'s grid."""
    explainer = explainer_for(model, method=method, target_layer=target_layer)
    with torch.enable_grad():
        maps, _ = explainer(image)
    data[SALIENCY_KEY] = MetaTensor(maps[0].cpu())
    inverted = Invertd(SALIENCY_KEY, transform=transform, orig_keys=IMAGE_KEY, nearest_interp=False)(data)
    saliency = inverted[SALIENCY_KEY]
    name = case_name(data)
    if tuple(saliency.shape) != tuple(original.shape):
        raise RuntimeError(f"case {name}: saliency shape {tuple(saliency.shape)} differs from the input's "
                           f"{tuple(original.shape)}")
    affine = np.asarray(original.affine.cpu().numpy(), dtype=np.float64)
    if not np.allclose(np.asarray(saliency.affine.cpu().numpy()), affine, atol=1e-4):
        raise RuntimeError(f"case {name}: saliency affine differs from the input's")
    return {SALIENCY_KEY: np.clip(saliency[0].cpu().numpy(), 0.0, 1.0).astype(np.float32), "affine": affine,
            IMAGE_KEY: np.asarray(original[0].cpu().numpy(), dtype=np.float32)}
