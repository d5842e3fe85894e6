"""MONAI bundles of the volumetric checkpoints (lung_seg, lesion_seg, covid_cls).

A bundle is a folder that a MONAI user runs without this repository::

    <bundle>/configs/metadata.json   versions, network_data_format, task, description, references
    <bundle>/configs/inference.json  MONAI-only inference: transforms, network, inferer, writer
    <bundle>/configs/logging.conf    logging for ``python -m monai.bundle run``
    <bundle>/models/model.pt         the network's state dict
    <bundle>/docs/README.md          the model, its input and output, the command, the pre-processing

``inference.json`` rebuilds what ``infer_volumetric.py`` does from the checkpoint's settings, with
MONAI components referenced by ``_target_`` and short ``$`` expressions (torch, numpy, scipy):
orientation, spacing and HU window; windows restricted to the body or lung bounding box
(``CropForegroundd`` to the same region as :func:`inference.crop_box` and
:func:`inference.window_region`: selection, margin, grown to at least the ROI); the task's
sliding-window inferer; argmax and the task's post-processing; ``Invertd`` back to the input's grid;
``SaveImaged``. covid_cls crops the lung box from the given lung mask, resizes, and writes the
COVID-19 probability with ``SaveClassificationd``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Identity, KeepLargestConnectedComponent

from models.volumetric.common import SegConfig, Task, hu_to_unit
from utils.checkpoint import resolve_builder
from utils.manifest import sha256_file
from utils.paths import refuse_overwriting_inputs

EXPORTABLE_TASKS = ("lung_seg", "lesion_seg", "covid_cls")
# The files export_bundle writes, relative to the bundle folder.
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "docs/README.md")
# Project builder -> (MONAI network the builder returns, constructor arguments the builder fixes).
NETWORKS = {
    "models.volumetric.lung_seg.build_network": ("AHNet", {"spatial_dims": 3, "pretrained": False}),
    "models.volumetric.lesion_seg.build_network": ("SegResNet", {"spatial_dims": 3}),
    "models.volumetric.covid_cls.build_network": ("DenseNet121", {"spatial_dims": 3}),
}
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
NO_INPUT = "no input scan: pass --input_file SCAN.nii.gz or --dataset_dir FOLDER (of .nii/.nii.gz files)"
NO_CLS_INPUT = "covid_cls needs --input_file SCAN.nii.gz and --lung_mask_file LUNG_MASK.nii.gz (same grid)"
REFERENCES = {
    "lung_seg": "Liu S. et al. 3D Anisotropic Hybrid Network: Transferring Convolutional Features from 2D "
                "Images to 3D Anisotropic Volumes. MICCAI 2018. https://arxiv.org/abs/1711.08580",
    "lesion_seg": "Myronenko A. 3D MRI brain tumor segmentation using autoencoder regularization. "
                  "BrainLes 2018. https://arxiv.org/abs/1810.11654",
    "covid_cls": "Huang G. et al. Densely Connected Convolutional Networks. CVPR 2017. "
                 "https://arxiv.org/abs/1608.06993",
}
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def load_exportable(path: str | Path, *, task_name: str) -> tuple[Task, Any, dict]:
    """The task, its pre-processing settings and the checkpoint, checked for export.

    The model is rebuilt and its weights loaded strictly, so a bundle is only written from a
    checkpoint that ``infer_volumetric.py`` can run.

    Args:
        path: checkpoint written by ``train_volumetric.py``.
        task_name: one of :data:`EXPORTABLE_TASKS`.

    Returns:
        (task, config: SegConfig or ClsConfig, checkpoint dict).

    Raises:
        ValueError: for a task without a bundle, a checkpoint of another task or builder, or a file
            that is not a volumetric checkpoint (each naming the file or task).
        FileNotFoundError: when ``path`` does not exist.
    """
    from models.volumetric.inference import load_task_model

    if task_name not in EXPORTABLE_TASKS:
        raise ValueError(f"cannot export task {task_name!r} as a bundle; choose one of {list(EXPORTABLE_TASKS)}")
    _, task, config, ckpt = load_task_model(path, device=torch.device("cpu"), task_name=task_name)
    if ckpt["builder"] != task.builder:
        raise ValueError(f"{path}: builder {ckpt['builder']!r} is not {task.name}'s {task.builder!r}; "
                         "only the task's own network can be written as a MONAI-only bundle")
    return task, config, ckpt


def network_definition(builder: str, builder_kwargs: dict) -> dict:
    """The ``network_def`` entry: the MONAI class the builder returns and all its arguments.

    The builder's own defaults are written out, so the bundle does not depend on MONAI's defaults
    (AH-Net's ``psp_block_num`` default differs from ours, for one).

    Raises:
        ValueError: for a builder without a MONAI equivalent, or unknown keyword arguments.
    """
    if builder not in NETWORKS:
        raise ValueError(f"builder {builder!r} has no MONAI network definition; known: {sorted(NETWORKS)}")
    target, fixed = NETWORKS[builder]
    parameters = inspect.signature(resolve_builder(builder)).parameters
    unknown = sorted(set(builder_kwargs) - set(parameters))
    if unknown:
        raise ValueError(f"builder {builder} has no arguments {unknown}")
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {"_target_": target, **fixed, **_plain({**defaults, **builder_kwargs})}


def inference_config(task: Task, config: Any, *, network_def: dict) -> dict:
    """``configs/inference.json`` of the task (see the module docstring)."""
    body = _seg_config(task, config) if task.kind == "segmentation" else _cls_config(config)
    return {
        "imports": body.pop("imports"),
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "output_dir": "$@bundle_root + '/eval'",
        "network_def": network_def,
        # Channels-last weights (and windows) as infer_volumetric.py uses them: the same numbers, and
        # about 2x faster 3D convolutions on CPU.
        "network": "$@network_def.to(@device, memory_format=torch.channels_last_3d)",
        **body,
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "initialize": ["$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
                       "$@network.eval()"],
        "run": ["$[@postprocessing(@predict(item)) for item in @dataset]"],
    }


def _seg_config(task: Task, config: SegConfig) -> dict:
    low, high = config.hu_window
    crop, imports = _crop_entries(config)
    transforms = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": config.orientation, "labels": None},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(config.spacing), "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
    ]
    if crop:
        transforms.append({"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                           "select_fn": "@crop_select", "margin": 0, "allow_smaller": True})
    post = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, *_task_postprocessing(task, config),
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": task.name,
             "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False,
             "separate_folder": False, "print_log": True}]
    return {
        "imports": ["$import glob", "$import os", *imports],
        "input_file": "",
        "dataset_dir": "",
        "datalist": "$(lambda files: [{'image': f} for f in files] if files else (_ for _ in ()).throw("
                    f"ValueError({NO_INPUT!r})))([@input_file] if @input_file else "
                    "sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*'))) if @dataset_dir else [])",
        **crop,
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(config.roi_size),
                    "sw_batch_size": config.sw_batch_size, "overlap": _plain(config.overlap),
                    "mode": config.blend_mode},
        "predict": "$torch.no_grad()(lambda d: dict(d, pred=@inferer(d['image'].as_tensor()[None].to(@device), "
                   "lambda w: @network(w.contiguous(memory_format=torch.channels_last_3d)))[0].cpu()))",
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def _crop_entries(config: SegConfig) -> tuple[dict, list[str]]:
    """``crop_select`` (a mask of the windows' region) and the imports it needs.

    Mirrors :func:`models.volumetric.inference.crop_box` and :func:`inference.window_region`:
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


def _task_postprocessing(task: Task, config: SegConfig) -> list[dict]:
    """The task's post-processing on the label map as MONAI dictionary transforms on ``pred``.

    Raises:
        ValueError: when the task's post-processing has no MONAI dictionary equivalent here.
    """
    post = task.postprocessing(config)
    if isinstance(post, Identity):
        return []
    if isinstance(post, KeepLargestConnectedComponent):
        return [{"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
                 "applied_labels": _plain(post.applied_labels), "is_onehot": post.is_onehot,
                 "independent": post.independent, "connectivity": post.connectivity,
                 "num_components": post.num_components}]
    raise ValueError(f"{task.name}: post-processing {type(post).__name__} cannot be written as a MONAI transform")


def _cls_config(config: Any) -> dict:
    keys = ["image", "label_image"]
    low, high = config.hu_window
    transforms = [
        {"_target_": "LoadImaged", "keys": keys, "reader": "NibabelReader", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": keys, "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": keys, "axcodes": config.orientation, "labels": None},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
    ]
    if config.mask_intensity:
        transforms.append({"_target_": "MaskIntensityd", "keys": "image", "mask_key": "label_image"})
    transforms += [
        {"_target_": "CropForegroundd", "keys": keys, "source_key": "label_image",
         "margin": list(config.crop_margin), "allow_smaller": True},
        {"_target_": "Resized", "keys": keys, "spatial_size": list(config.roi_size), "mode": ["trilinear", "nearest"]},
    ]
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "SaveClassificationd", "keys": "pred", "meta_keys": "image_meta_dict",
             "output_dir": "@output_dir", "filename": "predictions.csv"}]
    return {
        "imports": [],
        "input_file": "",
        "lung_mask_file": "",
        "datalist": "$[{'image': @input_file, 'label_image': @lung_mask_file}] if @input_file and @lung_mask_file "
                    f"else (_ for _ in ()).throw(ValueError({NO_CLS_INPUT!r}))",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "predict": "$torch.no_grad()(lambda d: dict(d, pred=@network(d['image'].as_tensor()[None].to(@device))"
                   "[0].float().cpu()))",
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def metadata(task: Task, config: Any, ckpt: dict, *, network_def: dict, version: str, authors: str,
             copyright: str) -> dict:
    """``configs/metadata.json``: the MONAI bundle specification's keys plus the source checkpoint."""
    import monai
    import nibabel
    import scipy

    optional = {"nibabel": nibabel.__version__}
    if task.name == "lesion_seg" and config.crop_region == "lung":
        optional["scipy"] = scipy.__version__
    if task.name == "lung_seg":
        import skimage

        optional["scikit-image"] = skimage.__version__
    return {
        "schema": META_SCHEMA,
        "version": version,
        "changelog": {version: f"exported from a {task.name} checkpoint (epoch {ckpt['epoch']})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": optional,
        "name": f"covid_ct_{task.name}",
        "task": _TASK_TEXT[task.name],
        "description": _description(task, network_def),
        "authors": authors,
        "copyright": copyright,
        "intended_use": "Research only; not for clinical diagnosis.",
        "data_type": "nifti",
        "image_classes": "one-channel CT in Hounsfield units, windowed and scaled to [0, 1] by the pre-processing",
        **({"label_classes": "lung mask: any value above 0 is lung (used to crop the lung region)"}
           if task.kind != "segmentation" else {}),
        "pred_classes": _pred_classes(task),
        "eval_metrics": {k: v for k, v in (ckpt.get("metrics") or {}).items()
                         if k.startswith("val_") and isinstance(v, (int, float))},
        "references": [REFERENCES[task.name]],
        "network_data_format": _network_data_format(task, config, network_def),
        "source_checkpoint": {"task": task.name, "builder": ckpt["builder"], "epoch": ckpt["epoch"],
                              "task_config": config.to_dict()},
    }


_TASK_TEXT = {
    "lung_seg": "Lung segmentation of chest CT",
    "lesion_seg": "COVID-19 lesion (ground-glass opacity and consolidation) segmentation of chest CT",
    "covid_cls": "COVID-19 classification of the lung region of a chest CT",
}


def _description(task: Task, network_def: dict) -> str:
    what = {"lung_seg": "segments both lungs (one foreground class)",
            "lesion_seg": "segments COVID-19 lesions, ground-glass opacity and consolidation as one class",
            "covid_cls": "gives the probability that the scan shows COVID-19, from the lung region"}[task.name]
    return f"A 3D {network_def['_target_']} that {what}; trained with the covid-ct research codebase."


def _pred_classes(task: Task) -> str:
    if task.kind == "segmentation":
        return ", ".join(f"{i}: {name}" for i, name in enumerate(task.class_names))
    return "one logit; its sigmoid is the COVID-19 probability"


def _network_data_format(task: Task, config: Any, network_def: dict) -> dict:
    shape = list(config.roi_size)
    segmentation = task.kind == "segmentation"
    image = {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": network_def["in_channels"],
             "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1], "is_patch_data": segmentation,
             "channel_def": {"0": "image"}}
    if segmentation:
        pred = {"type": "image", "format": "labels", "num_channels": network_def["out_channels"],
                "spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): name for i, name in enumerate(task.class_names)}}
    else:
        pred = {"type": "probabilities", "format": "classes", "num_channels": network_def["out_channels"],
                "spatial_shape": [1], "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "COVID-19 (logit)"}}
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


def export_bundle(*, ckpt_path: str | Path, task_name: str, out_dir: str | Path, version: str = "0.1.0",
                  authors: str = "covid-ct project", copyright: str = "Copyright (c) the covid-ct project authors",
                  overwrite: bool = False) -> Path:
    """Write the bundle of a checkpoint and check that MONAI rebuilds the network from it.

    Args:
        ckpt_path: checkpoint written by ``train_volumetric.py``.
        task_name: ``lung_seg``, ``lesion_seg`` or ``covid_cls``; must be the checkpoint's task.
        out_dir: bundle folder; created, or refused when it holds files (unless ``overwrite``).
        version, authors, copyright: metadata fields.
        overwrite: replace the files of an existing bundle folder.

    Returns:
        The bundle folder.

    Raises:
        ValueError, FileNotFoundError: see :func:`load_exportable`; also for a non-empty ``out_dir``
            and for a bundle file that would replace the checkpoint.
    """
    out = Path(out_dir)
    refuse_overwriting_inputs([ckpt_path], [out / name for name in BUNDLE_FILES])
    task, config, ckpt = load_exportable(ckpt_path, task_name=task_name)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: folder exists and is not empty; choose another --out or pass --overwrite")
    network_def = network_definition(ckpt["builder"], ckpt["builder_kwargs"])
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    meta = metadata(task, config, ckpt, network_def=network_def, version=version, authors=authors,
                    copyright=copyright)
    meta["source_checkpoint"]["sha256"] = sha256_file(ckpt_path)
    _write_json(out / "configs" / "metadata.json", meta)
    _write_json(out / "configs" / "inference.json", inference_config(task, config, network_def=network_def))
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    torch.save(ckpt["model"], out / "models" / "model.pt")
    (out / "docs" / "README.md").write_text(readme(task, config, meta, network_def=network_def))
    check_bundle(out)
    return out


def check_bundle(bundle: str | Path) -> torch.nn.Module:
    """Parse the bundle with MONAI's ConfigParser, build ``network_def`` and load ``model.pt`` strictly.

    Returns:
        The bundle's network with its weights, in eval mode.

    Raises:
        RuntimeError: when the weights do not fit the network the config defines.
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    network = parser.get_parsed_content("network_def", instantiate=True)
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    return network.eval()


def readme(task: Task, config: Any, meta: dict, *, network_def: dict) -> str:
    """``docs/README.md``: the model, input and output, the command and the pre-processing."""
    net = meta["source_checkpoint"]
    network = next(iter(meta["network_data_format"]["inputs"].values()))
    segmentation = task.kind == "segmentation"
    lines = [f"# {meta['name']}", "", meta["description"], "", "## Model", "",
             f"- Network: MONAI `monai.networks.nets.{network_def['_target_']}`, weights in `models/model.pt` (state dict).",
             f"- Source checkpoint: task `{net['task']}`, epoch {net['epoch']}, sha256 `{net.get('sha256', '?')}`.",
             f"- Network input: {network['num_channels']} channel, {network['spatial_shape']} voxels, in [0, 1].",
             f"- Intended use: {meta['intended_use']}", "", "## Input and output", ""]
    lines += _io_lines(task) + ["", "## Run", "", "From the bundle folder (MONAI with nibabel"
                                f"{', scipy' if 'scipy' in meta['required_packages_version'] else ''}"
                                f"{', scikit-image' if task.name == 'lung_seg' else ''}; "
                                "`python -m monai.bundle` needs the `fire` package):", "", "```bash"]
    lines += _command_lines(task) + ["```", "", "Add `--device cpu` to stay on the CPU (default: the first GPU "
                                     "when there is one). From another folder, give the full path of "
                                     "`configs/inference.json` and add `--bundle_root PATH_OF_THE_BUNDLE`.", "",
                                     "## Pre-processing", ""]
    lines += [f"- {step}" for step in (_seg_steps(task, config) if segmentation else _cls_steps(config))]
    lines += ["", "## Agreement with the project's inference", "",
              "On phantom scans the bundle's masks equal `infer_volumetric.py`'s voxel for voxel, with the same "
              "shape and affine, on CPU and CUDA; the network runs with channels-last weights and windows as "
              "there (other layouts round differently and flip a few near-tie voxels)." if segmentation else
              "On phantom scans the bundle's probability equals `infer_volumetric.py`'s to 1e-6, on CPU and CUDA.",
              "",
              "Not carried over: the project reads DICOM series and checks that intensities look like HU; the "
              "bundle reads NIfTI only (convert DICOM first, e.g. with the project's convert_dicom.py)"
              + ("." if segmentation else "; an empty lung mask, which the project refuses by name, makes the "
                 "bundle fail at the resize (an empty crop)."), ""]
    return "\n".join(lines)


def _io_lines(task: Task) -> list[str]:
    if task.kind == "segmentation":
        return ["- Input: a chest CT volume in Hounsfield units, NIfTI (`--input_file`), or every .nii/.nii.gz "
                "of a folder (`--dataset_dir`).",
                f"- Output: `<output_dir>/<scan>_{task.name}.nii.gz`, uint8 labels "
                f"({', '.join(f'{i} {n}' for i, n in enumerate(task.class_names))}) with exactly the input's "
                "shape and affine. `output_dir` defaults to `<bundle_root>/eval`."]
    return ["- Input: a chest CT volume in Hounsfield units (`--input_file`) and its lung mask on the same grid "
            "(`--lung_mask_file`, any value above 0 is lung; the project's lung_seg bundle makes one), NIfTI.",
            "- Output: `<output_dir>/predictions.csv`, one line `<scan path>,<COVID-19 probability>` per scan "
            "(probability in [0, 1]; the project calls 0.5 and above COVID-19). `output_dir` defaults to "
            "`<bundle_root>/eval`."]


def _command_lines(task: Task) -> list[str]:
    base = "python -m monai.bundle run --config_file configs/inference.json"
    if task.kind == "segmentation":
        return [f"{base} --input_file /data/scan.nii.gz --output_dir out",
                f"{base} --dataset_dir /data/scans --output_dir out"]
    return [f"{base} --input_file /data/scan.nii.gz --lung_mask_file /data/scan_lung.nii.gz --output_dir out"]


def _seg_steps(task: Task, config: SegConfig) -> list[str]:
    low, high = config.hu_window
    crop = {"none": "Windows cover the whole volume.",
            "body": f"Windows cover the bounding box of the body (voxels above {config.body_threshold_hu:g} HU) "
                    f"plus {config.crop_margin} voxels, grown to at least the window size inside the volume; the rest "
                    "is background.",
            "lung": f"Windows cover the bounding box of the darker voxels (below {config.body_threshold_hu:g} HU) "
                    f"that the body outline encloses in their axial slice (lungs and airways) plus "
                    f"{config.crop_margin} voxels, grown to at least the window size inside the volume; the rest is "
                    "background."}[config.crop_region]
    post = ("Post-processing: argmax, then the two largest connected lung components are kept."
            if task.name == "lung_seg" else "Post-processing: argmax.")
    return [f"Orientation {config.orientation}; resampling to {list(config.spacing)} mm (bilinear).",
            f"Intensities clipped to [{low:g}, {high:g}] HU and scaled to [0, 1].", crop,
            f"Sliding window {list(config.roi_size)}, overlap {config.overlap}, {config.sw_batch_size} windows per "
            f"call, {config.blend_mode} blending.", post,
            "The mask is resampled back to the input's grid (nearest neighbour) with MONAI's Invertd."]


def _cls_steps(config: Any) -> list[str]:
    low, high = config.hu_window
    steps = [f"Orientation {config.orientation} (image and lung mask); no resampling.",
             f"Intensities clipped to [{low:g}, {high:g}] HU and scaled to [0, 1]."]
    if config.mask_intensity:
        steps.append("Voxels outside the lung mask are set to 0.")
    return steps + [f"Crop to the lung mask's bounding box plus {list(config.crop_margin)} voxels (x, y, z).",
                    f"Resize to {list(config.roi_size)} (trilinear); one network call; sigmoid of the logit."]


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=4) + "\n")


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (JSON)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
