"""Helpers shared by the test modules: tiny phantoms, datalists, checkpoints and original-format files."""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import re
import sys
import types
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
import torch.nn.backends.thnn
import torchvision
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from torch import nn

from models.mask_net import maskrcnn_resnet_fpn
from models.volumetric import get_task
from models.volumetric.common import IMAGE_KEY, LABEL_KEY
from models.volumetric.covid_cls import ClsConfig
from utils.checkpoint import make_checkpoint, save_checkpoint

# from tests/test_volumetric_data.py
TINY_SHAPE = (64, 64, 16)


TINY_SPACING = (1.5, 1.5, 4.0)


TINY_CONFIG = {
    "lesion_seg": {"spacing": (2.0, 2.0, 4.0), "roi_size": (32, 32, 16)},
    "lung_seg": {"spacing": (2.0, 2.0, 4.0), "roi_size": (64, 64, 32)},
}


def chest_phantom(*, seed: int, shape=TINY_SHAPE, spacing=TINY_SPACING, orientation: str = "RAS") -> dict:
    """HU phantom: body ellipse, two lungs (labels 1, 2), lesions (1 GGO, 2 consolidation).

    Uses ``datasets.synthetic.make_chest_volume`` when available, else a simple ellipsoid phantom.
    """
    try:
        from datasets.synthetic import make_chest_volume
    except ImportError:  # the package may export it from its volumes module only
        try:
            from datasets.synthetic.volumes import make_chest_volume
        except ImportError:
            return _ellipsoid_phantom(seed=seed, shape=shape, spacing=spacing, orientation=orientation)
    return make_chest_volume(seed=seed, shape=shape, spacing=spacing, cls=2, orientation=orientation)


def _ellipsoid_phantom(*, seed, shape, spacing, orientation) -> dict:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    image = np.full(shape, -1000, np.int16)
    image[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
    lung = np.zeros(shape, np.uint8)
    for value, cx in ((1, 0.42), (2, -0.42)):
        lung[((x - cx) / 0.32) ** 2 + (y / 0.5) ** 2 + (z / 0.95) ** 2 < 1] = value
    image[lung > 0] = -850
    lesion = np.zeros(shape, np.uint8)
    cx, cy = rng.uniform(0.3, 0.5), rng.uniform(-0.2, 0.2)
    blob = ((x - cx) / 0.12) ** 2 + ((y - cy) / 0.15) ** 2 + (z / 0.6) ** 2 < 1
    lesion[blob & (lung > 0)] = 1
    image[lesion == 1] = -400
    image = image + rng.normal(0, 10, shape).astype(np.int16)
    signs = [1.0 if c in "RAS" else -1.0 for c in orientation]
    affine = np.diag([s * d for s, d in zip(signs, spacing)] + [1.0])
    affine[:3, 3] = [-s * d * n / 2 for s, d, n in zip(signs, spacing, shape)]
    return {"image": image, "lung": lung, "lesion": lesion, "affine": affine, "cls": 2}


def write_case(folder: Path, name: str, *, seed: int, label: str = "lung", orientation: str = "RAS",
               spacing=TINY_SPACING, shape=TINY_SHAPE) -> dict:
    """Write ``<name>.nii.gz`` and ``<name>_<label>.nii.gz``; returns the case dict (absolute paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = chest_phantom(seed=seed, shape=shape, spacing=spacing, orientation=orientation)
    image_path, label_path = folder / f"{name}.nii.gz", folder / f"{name}_{label}.nii.gz"
    nib.save(nib.Nifti1Image(volume["image"].astype(np.int16), volume["affine"]), image_path)
    nib.save(nib.Nifti1Image(volume[label].astype(np.uint8), volume["affine"]), label_path)
    return {IMAGE_KEY: str(image_path), LABEL_KEY: str(label_path), "case": name}


def write_dicom_series(folder: Path, hu: np.ndarray, *, spacing=(0.8, 0.9, 3.0)) -> Path:
    """Write ``hu`` Int16[X, Y, Z] as a CT series, one file per slice, stored with intercept -1024."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality, ds.PatientID = series, study, "CT", "phantom"
        ds.InstanceNumber = hu.shape[2] - k  # files not in slice order
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"slice_{(k * 7) % hu.shape[2]:03d}_{k}.dcm", enforce_file_format=True)
    return folder


def write_slice_phantom(out: Path, *, slices_per_patient: int) -> Path:
    """A tiny 2D phantom (3 patients each of segmentation and classification, 64-px slices) in ``out``."""
    from datasets.synthetic import generate_dataset

    generate_dataset(out, seed=2, n_patients=3, n_seg_patients=3, slices_per_patient=slices_per_patient,
                     image_size=64, outputs=("seg", "cls"), montage=False)
    return out


def write_datalist(root: Path, *, label: str = "lung", n_train: int = 2, n_val: int = 1) -> Path:
    """A dataset.json with relative paths and training/validation/testing sections."""
    cases = [write_case(root / "volumes", f"case{i}", seed=i, label=label) for i in range(n_train + n_val)]
    rel = [{k: str(Path(v).relative_to(root)) for k, v in c.items() if k != "case"} for c in cases]
    datalist = {"training": rel[:n_train], "validation": rel[n_train:],
                "testing": [r[IMAGE_KEY] for r in rel[n_train:]]}
    path = root / "dataset.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path



# from tests/test_datasets_io.py
CT_SMALL = get_testdata_file("CT_small.dcm")


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_series(folder, *, n=5, uid=None, rows=12, cols=10, pixel_spacing=(0.7, 0.5), iop=AXIAL,
                 origin=(-20.0, -30.0, 40.0), gap=2.5, slope=1.0, intercept=-1024.0, description="chest",
                 seed=0, skip=(), name_prefix=""):
    """Write a series from CT_small.dcm's dataset, files named in shuffled order; returns uid and
    the stored pixel arrays [rows, cols] in position order (k = 0 at ``origin``)."""
    base = pydicom.dcmread(CT_SMALL)
    uid = uid or generate_uid()
    rng = np.random.default_rng(seed)
    normal = np.cross(iop[:3], iop[3:])
    order = rng.permutation(n)
    stored = []
    for k in range(n):
        pixels = rng.integers(0, 2000, size=(rows, cols)).astype(np.int16)
        pixels[0, 0] = 100 * k  # marks the slice
        stored.append(pixels)
        if k in skip:
            continue
        ds = copy.deepcopy(base)
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = list(pixel_spacing)
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * gap * normal]
        ds.InstanceNumber = k + 1
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SeriesDescription = description
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{name_prefix}{order[k]:03d}.dcm", enforce_file_format=True)
    return uid, stored



# from tests/test_convert_checkpoint.py
SEG_MODULE, CLS_MODULE = "models.mask_net.rpn_segmentation", "models.mask_net.rpn"


SIZES, RATIOS = tuple([(2, 4, 8, 16, 32)] * 5), tuple([(0.1, 0.25, 0.5, 1, 1.5, 2)] * 5)


def old_name(key: str) -> str:
    """Our parameter name -> the original's (torchvision 0.3, ``s2new``)."""
    key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
    key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    key = re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.", key)
    for ours, theirs in (("0", "fc_scores"), ("2", "fc_scores_2"), ("4", "fc_scores_img")):
        key = key.replace(f"s_module.{ours}.", f"s2new.{theirs}.")
    return key


class Torch11Backend:
    """torch 1.1 modules carry ``_backend``, pickled as a call of this function."""

    def __reduce__(self):
        return torch.nn.backends.thnn._get_thnn_function_backend, ()


@contextlib.contextmanager
def fake_module(name: str):
    """A module ``name`` with the original's AnchorGenerator class, in sys.modules only inside the block."""
    saved = sys.modules.get(name)
    module = types.ModuleType(name)

    def __init__(self, sizes, aspect_ratios):
        nn.Module.__init__(self)
        self.sizes, self.aspect_ratios, self._backend = sizes, aspect_ratios, Torch11Backend()
        self.cell_anchors = [torch.zeros(len(sizes[0]) * len(aspect_ratios[0]), 4)]
        self._cache = {(torch.Size([16, 16]), (32.0, 32.0)): [torch.ones(5, 4)]}

    module.AnchorGenerator = type("AnchorGenerator", (nn.Module,), {"__init__": __init__, "__module__": name})
    sys.modules[name] = module
    try:
        yield module
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


def write_original(path: Path, model: nn.Module, *, anchor_module: str | None = SEG_MODULE, sizes=SIZES,
                   ratios=RATIOS, legacy_format: bool = True, weights=None, **fields) -> Path:
    """Save ``model`` as the original would have (or ``weights``, already in the original's names)."""
    weights = weights if weights is not None else collections.OrderedDict(
        (old_name(k), v) for k, v in model.state_dict().items())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    state = {"epoch": "20", "model_name": "original_model", "model_weights": weights, "lrate": 1e-5,
             "optimizer_state": optimizer.state_dict(), **fields}
    if anchor_module is not None:
        with fake_module(anchor_module) as module, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Couldn't retrieve source code")  # the fake class has no source file
            state["anchor_generator"] = module.AnchorGenerator(sizes, ratios)
            torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)
    return path


def seg_model(**kwargs):
    torch.manual_seed(0)
    return maskrcnn_resnet_fpn(**{"backbone_name": "resnet18", "truncation": 1, "num_classes": 3, **kwargs}).eval()



# from tests/test_volumetric_covid_cls.py
TINY_NET = {"init_features": 8, "growth_rate": 4}


def cls_chest_phantom(shape=(48, 40, 20), seed=0):
    """Int16 HU body ellipse with two ellipsoid lungs (-850 HU); uint8 lung mask (1 left, 2 right)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    cx, cy, cz = (s / 2 for s in shape)
    body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.45 * shape[1])) ** 2 <= 1
    lung = np.zeros(shape, np.uint8)
    for value, offset in ((1, -0.2), (2, 0.2)):
        ellipsoid = (((x - cx - offset * shape[0]) / (0.15 * shape[0])) ** 2 + ((y - cy) / (0.25 * shape[1])) ** 2
                     + ((z - cz) / (0.3 * shape[2])) ** 2) <= 1
        lung[ellipsoid] = value
    image = np.full(shape, -1000, np.int16)
    image[body] = 40
    image[lung > 0] = -850
    return (image + rng.normal(0, 5, shape)).astype(np.int16), lung


def write_cls_case(folder, name, *, affine=None, shape=(48, 40, 20), label=1, seed=0, lung=None):
    """NIfTI image + lung mask; returns the case dict and the arrays."""
    image, mask = cls_chest_phantom(shape, seed)
    mask = mask if lung is None else lung
    affine = np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine
    paths = {}
    for key, array in (("image", image), ("label_image", mask)):
        paths[key] = str(folder / f"{name}_{key}.nii.gz")
        nib.save(nib.Nifti1Image(array, affine), paths[key])
    return {**paths, "label": label, "case": name}, image, mask


def lps_affine():
    """Anisotropic LPS grid with an offset: x to the left, y posterior."""
    affine = np.diag([-0.7, -0.9, 2.5, 1.0])
    affine[:3, 3] = [12.0, -8.0, 30.0]
    return affine


def cls_datalist(root):
    """dataset.json of phantom chest CTs (RAS and LPS) with lung masks and COVID-19 labels."""
    import json

    from datasets.synthetic import make_chest_volume

    root.mkdir(parents=True, exist_ok=True)

    def case(i, cls):
        volume = make_chest_volume(seed=i, shape=(48, 48, 12), spacing=(6.0, 6.0, 20.0), cls=cls,
                                   orientation="LPS" if i % 2 else "RAS")
        for key, array in (("image", volume["image"]), ("lung", volume["lung"])):
            nib.save(nib.Nifti1Image(array, volume["affine"]), root / f"chest{i}_{key}.nii.gz")
        return {"image": f"chest{i}_image.nii.gz", "label_image": f"chest{i}_lung.nii.gz", "label": int(cls == 2)}

    datalist = {"training": [case(0, 0), case(1, 2)], "validation": [case(2, 2), case(3, 1)]}
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root / "dataset.json"



# from tests/test_mask_net.py
def randomise_batchnorm(model):
    """Seeded random running statistics and affine values in every BatchNorm of ``model``, for folding tests."""
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)



# from tests/test_analyze_scan.py
VOLUMETRIC = {"lung_seg": {"psp_block_num": 0}, "lesion_seg": {"init_filters": 8},
              "covid_cls": {"init_features": 8, "growth_rate": 4}}


def volumetric_checkpoint(name: str, path):
    task = get_task(name)
    model, kwargs = task.build_network(**VOLUMETRIC[name])
    if name == "covid_cls":
        config = ClsConfig(roi_size=(32, 32, 32)).to_dict()
    else:
        config = task.make_config(**TINY_CONFIG[name]).to_dict()
    save_checkpoint(make_checkpoint(model=model, builder=task.builder, builder_kwargs=kwargs, epoch=0,
                                    task=name, task_config=config), path)
    return path




ANALYSIS_CLS_KWARGS = dict(backbone_name="resnet18", truncation=2, num_classes=3, roi_batch_size=8, s_features=16,
                           min_size=64, max_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)


def analysis_checkpoints(folder: Path) -> dict[str, Path]:
    """Randomly initialised, tiny checkpoints of the four models of ``analyze_scan.py``, in the project's schema."""
    from models.mask_net.covid_mask_net import CLASSIFIER_BUILDER, covid_mask_net

    torch.manual_seed(0)
    paths = {name: volumetric_checkpoint(name, folder / f"{name}.pth") for name in VOLUMETRIC}
    model = covid_mask_net(**ANALYSIS_CLS_KWARGS)
    paths["mask_net_classifier"] = save_checkpoint(make_checkpoint(
        model=model, builder=CLASSIFIER_BUILDER, builder_kwargs=ANALYSIS_CLS_KWARGS, epoch=0,
        mask_type="both"), folder / "mask_net_classifier.pth")
    return paths


def analysis_flags(checkpoints: dict) -> list[str]:
    """``analyze_scan.py`` flags naming the four checkpoints."""
    return ["--lung_ckpt", str(checkpoints["lung_seg"]), "--lesion_ckpt", str(checkpoints["lesion_seg"]),
            "--covid3d_ckpt", str(checkpoints["covid_cls"]), "--covid2d_ckpt", str(checkpoints["mask_net_classifier"])]
