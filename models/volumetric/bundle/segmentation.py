"""The MONAI bundle of a binary segmentation task (lung_seg, lesion_seg): :func:`segmentation_bundle`.

``inference.json`` rebuilds what ``infer_volumetric.py`` does from the checkpoint's settings, with
MONAI components referenced by ``_target_`` and short ``$`` expressions (torch, numpy, scipy):
orientation, spacing and HU window (:func:`models.volumetric.segmentation.bundle_preprocessing`);
windows restricted to the body or lung bounding box (``CropForegroundd`` to the region of
:func:`models.volumetric.sliding_window.bundle_crop_entries`); the task's sliding-window inferer;
softmax; ``Invertd`` of the probabilities back to the input's grid (the image's interpolation);
argmax and the task's post-processing there; ``SaveImaged``.
"""
from __future__ import annotations

from typing import Callable

from models.volumetric.bundle.spec import BundleSpec, plain
from models.volumetric.config import SegConfig
from models.volumetric.segmentation import bundle_preprocessing
from models.volumetric.sliding_window import bundle_crop_entries

NO_INPUT = "no input scan: pass --input_file SCAN.nii.gz or --dataset_dir FOLDER (of .nii/.nii.gz files)"
AGREEMENT = ("On phantom scans the bundle's masks equal `infer_volumetric.py`'s voxel for voxel, with the same "
             "shape and affine, on CPU and CUDA; the network runs with channels-last weights and windows as "
             "there (other layouts round differently and flip a few near-tie voxels).")


def segmentation_bundle(*, network: str, fixed_args: dict, task_text: str, purpose: str, reference: str,
                        postprocessing: Callable[[SegConfig], list[dict]], post_text: str,
                        packages: tuple[str, ...] = ()) -> BundleSpec:
    """The bundle spec of a segmentation task.

    Args:
        network, fixed_args, task_text, purpose, reference: see :class:`BundleSpec`.
        postprocessing: ``f(config) -> list`` of bundle transforms on ``pred`` (after the argmax)
            that do what the task's ``postprocessing`` does; kept beside it in the task's module.
        post_text: the README's post-processing step.
        packages: packages the post-processing needs (scipy is added for the lung crop region).
    """
    return BundleSpec(
        network=network, fixed_args=fixed_args, task_text=task_text, purpose=purpose, reference=reference,
        inference=lambda task, config: _inference(task, config, postprocessing(config)),
        data_format=_data_format, pred_classes=_pred_classes,
        packages=lambda config: (*(("scipy",) if config.crop_region == "lung" else ()), *packages),
        io_lines=_io_lines, steps=lambda task, config: _steps(config, post_text),
        run_inputs=("--input_file /data/scan.nii.gz", "--dataset_dir /data/scans"),
        run_hint="--input_file SCAN.nii.gz", agreement=AGREEMENT)


def _inference(task, config: SegConfig, post: list[dict]) -> dict:
    """The task's ``inference.json`` entries: inputs, datalist, crop, pre-processing, inferer, post-processing."""
    crop, imports = bundle_crop_entries(config)
    transforms = bundle_preprocessing(config)
    if crop:
        transforms.append({"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                           "select_fn": "@crop_select", "margin": 0, "allow_smaller": True})
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, *post,
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
                    "sw_batch_size": config.sw_batch_size, "overlap": plain(config.overlap),
                    "mode": config.blend_mode},
        "predict": "$torch.no_grad()(lambda d: dict(d, pred=@inferer(d['image'].as_tensor()[None].to(@device), "
                   "lambda w: @network(w.contiguous(memory_format=torch.channels_last_3d)))[0].cpu()))",
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def _pred_classes(task) -> str:
    return ", ".join(f"{i}: {name}" for i, name in enumerate(task.class_names))


def _data_format(task, config: SegConfig, network_def: dict) -> dict:
    shape = list(config.roi_size)
    image = {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": network_def["in_channels"],
             "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
             "channel_def": {"0": "image"}}
    pred = {"type": "image", "format": "labels", "num_channels": network_def["out_channels"],
            "spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": True,
            "channel_def": {str(i): name for i, name in enumerate(task.class_names)}}
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


def _io_lines(task) -> list[str]:
    return ["- Input: a chest CT volume in Hounsfield units, NIfTI (`--input_file`), or every .nii/.nii.gz "
            "of a folder (`--dataset_dir`).",
            f"- Output: `<output_dir>/<scan>_{task.name}.nii.gz`, uint8 labels "
            f"({', '.join(f'{i} {n}' for i, n in enumerate(task.class_names))}) with exactly the input's "
            "shape and affine. `output_dir` defaults to `<bundle_root>/eval`."]


def _steps(config: SegConfig, post_text: str) -> list[str]:
    low, high = config.hu_window
    crop = {"none": "Windows cover the whole volume.",
            "body": f"Windows cover the bounding box of the body (voxels above {config.body_threshold_hu:g} HU) "
                    f"plus {config.crop_margin} voxels, grown to at least the window size inside the volume; the rest "
                    "is background.",
            "lung": f"Windows cover the bounding box of the darker voxels (below {config.body_threshold_hu:g} HU) "
                    f"that the body outline encloses in their axial slice (lungs and airways) plus "
                    f"{config.crop_margin} voxels, grown to at least the window size inside the volume; the rest is "
                    "background."}[config.crop_region]
    return [f"Orientation {config.orientation}; resampling to {list(config.spacing)} mm (bilinear).",
            f"Intensities clipped to [{low:g}, {high:g}] HU and scaled to [0, 1].", crop,
            f"Sliding window {list(config.roi_size)}, overlap {config.overlap}, {config.sw_batch_size} windows per "
            f"call, {config.blend_mode} blending.",
            "The class probabilities (softmax) are resampled back to the input's grid (trilinear) with MONAI's "
            "Invertd; the argmax and post-processing run there.", post_text]
