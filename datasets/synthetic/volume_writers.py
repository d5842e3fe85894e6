"""Write chest and abdomen phantom volumes as NIfTI with Clara/MSD-style datalists."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from datasets.conventions import CLASS_COVID, CLASS_NAMES
from datasets.io import Volume, write_nifti

from .abdomen import ORGAN_NAMES, make_abdomen_volume
from .volumes import make_chest_volume
from .writers import ID_BASE, VOLUME_SPLITS, _run, patient_classes, patient_seed, split_patients

SLICE_SPACINGS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
LUNG_LABELS = {"0": "background", "1": "left lung", "2": "right lung"}
LESION_LABELS = {"0": "background", "1": "ground-glass opacity", "2": "consolidation"}
COVID_LABELS = {"0": "non-COVID (Control or CP)", "1": "COVID-19"}


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Save ``data`` (int16 HU or uint8 labels) with ``affine`` as qform and sform, through the one writer."""
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(affine))
    write_nifti(Volume(data, np.asarray(affine, dtype=np.float64), spacing, str(path)), path)


def volume_geometry(rng, volume_shape) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Draw a scan geometry: square pixels of 0.6-0.9 mm and a slice spacing of 1-5 mm.

    ``volume_shape[2]`` is the slice count at 2.5 mm; thinner slices give proportionally more.
    """
    pixel = float(np.round(rng.uniform(0.6, 0.9), 3))
    sz = float(rng.choice(SLICE_SPACINGS))
    nz = max(8, int(round(volume_shape[2] * 2.5 / sz)))
    return (int(volume_shape[0]), int(volume_shape[1]), nz), (pixel, pixel, sz)


def _chest_task(task: dict) -> dict:
    rng = np.random.default_rng([task["pseed"], 5])
    shape, spacing = volume_geometry(rng, task["volume_shape"])
    vol = make_chest_volume(seed=task["pseed"], shape=shape, spacing=spacing, cls=task["cls"],
                            orientation=task["orientation"])
    root, name = Path(task["root"]), task["name"]
    save_nifti(root / "imagesTr" / name, vol["image"], vol["affine"])
    save_nifti(root / "labelsTr" / name, vol["lung"], vol["affine"])
    save_nifti(root / "lesionsTr" / name, vol["lesion"], vol["affine"])
    return dict(name=name, cls=task["cls"], shape=shape, spacing=spacing, orientation=task["orientation"])


def _datalist(name: str, description: str, labels: dict, entries: dict) -> dict:
    return {"name": name, "description": description, "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": labels, **entries}


def write_volumes(out: Path, *, seed: int, n_volumes: int, volume_shape, workers: int,
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict:
    """Chest NIfTI volumes and their datalists under ``out/volumes``, split by patient in ``fractions``
    (training, validation, test).

    Files: ``imagesTr/chest_<pid>.nii.gz`` (int16 HU), ``labelsTr/`` (lungs: 0, 1 left, 2 right),
    ``lesionsTr/`` (0, 1 GGO, 2 consolidation), same names. Datalists (paths relative to
    ``out/volumes``): ``dataset_lung.json`` and ``dataset_lesion.json`` with ``{"image", "label"}``
    entries, ``dataset_covid.json`` (and its copy ``dataset.json``) with
    ``{"image", "label_image", "label"}`` entries (lung mask, 0/1 COVID-19).
    """
    root = out / "volumes"
    for sub in ("imagesTr", "labelsTr", "lesionsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    classes = patient_classes("volumes", n_volumes, seed)
    splits = split_patients(classes, VOLUME_SPLITS, tuple(fractions), seed)
    tasks = [dict(pid=pid, cls=cls, pseed=patient_seed(seed, pid), root=str(root), name=f"chest_{pid}.nii.gz",
                  volume_shape=tuple(volume_shape), orientation=("RAS", "LPS")[i % 2])
             for i, (pid, cls) in enumerate(classes.items())]
    records = _run(_chest_task, tasks, workers)
    lists = {key: {s: [] for s in VOLUME_SPLITS} for key in ("lung", "lesion", "covid")}
    for rec, task in zip(records, tasks):
        split, name = splits[task["pid"]], rec["name"]
        lists["lung"][split].append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        lists["lesion"][split].append({"image": f"imagesTr/{name}", "label": f"lesionsTr/{name}"})
        lists["covid"][split].append({"image": f"imagesTr/{name}", "label_image": f"labelsTr/{name}",
                                      "label": int(rec["cls"] == CLASS_COVID), "class": CLASS_NAMES[rec["cls"]]})
    files = {
        "lung": _datalist("phantom chest lungs", "lung segmentation", LUNG_LABELS, lists["lung"]),
        "lesion": _datalist("phantom chest lesions", "lesion segmentation", LESION_LABELS, lists["lesion"]),
        "covid": _datalist("phantom chest COVID-19", "COVID-19 classification", COVID_LABELS, lists["covid"]),
    }
    paths = {}
    for key, content in files.items():
        paths[key] = root / f"dataset_{key}.json"
        paths[key].write_text(json.dumps(content, indent=1))
    (root / "dataset.json").write_text(json.dumps(files["covid"], indent=1))
    return dict(root=str(root), volumes=len(records), datalists={k: str(v) for k, v in paths.items()},
                counts={s: len(lists["covid"][s]) for s in VOLUME_SPLITS}, records=records)


def _abdomen_task(task: dict) -> dict:
    rng = np.random.default_rng([task["pseed"], 6])
    pixel = float(np.round(rng.uniform(0.6, 0.95), 3))
    spacing = (pixel, pixel, float(rng.choice((2.5, 3.0, 4.0, 5.0))))
    vol = make_abdomen_volume(seed=task["pseed"], shape=task["shape"], spacing=spacing, orientation=task["orientation"])
    root = Path(task["root"])
    save_nifti(root / "imagesTr" / f"img{task['index']:04d}.nii.gz", vol["image"], vol["affine"])
    save_nifti(root / "labelsTr" / f"label{task['index']:04d}.nii.gz", vol["label"], vol["affine"])
    return dict(image=f"imagesTr/img{task['index']:04d}.nii.gz", label=f"labelsTr/label{task['index']:04d}.nii.gz")


def write_abdomen(out: Path, *, seed: int, n_abdomen: int, abdomen_shape, workers: int) -> dict:
    """BTCV-like ``abdomen/imagesTr/img0001.nii.gz``, ``labelsTr/label0001.nii.gz`` and ``dataset.json``."""
    root = out / "abdomen"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pids = [ID_BASE["abdomen"] + i for i in range(n_abdomen)]
    tasks = [dict(index=i + 1, pseed=patient_seed(seed, pid), root=str(root), shape=tuple(abdomen_shape),
                  orientation=("RAS", "LPS")[i % 2]) for i, pid in enumerate(pids)]
    entries = _run(_abdomen_task, tasks, workers)
    splits = split_patients({i: 0 for i in range(len(entries))}, VOLUME_SPLITS, (0.6, 0.2, 0.2), seed)
    lists = {s: [e for i, e in enumerate(entries) if splits[i] == s] for s in VOLUME_SPLITS}
    labels = {str(i): name for i, name in enumerate(ORGAN_NAMES)}
    content = _datalist("phantom BTCV", "abdominal multi-organ segmentation", labels, lists)
    (root / "dataset.json").write_text(json.dumps(content, indent=1))
    return dict(root=str(root), volumes=len(entries), datalist=str(root / "dataset.json"),
                counts={s: len(v) for s, v in lists.items()})
