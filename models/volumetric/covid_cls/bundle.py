"""The classifier's MONAI bundle: a NIfTI scan and its lung mask in, the COVID-19 probability out.

``inference.json`` crops the lung box from the given lung mask and resizes
(:func:`models.volumetric.covid_cls.transforms.bundle_preprocessing`), runs the network once and
writes the sigmoid of its logit with ``SaveClassificationd``.
"""
from __future__ import annotations

from models.volumetric.bundle.spec import BundleSpec
from models.volumetric.covid_cls.config import ClsConfig
from models.volumetric.covid_cls.transforms import bundle_preprocessing

NO_INPUT = "covid_cls needs --input_file SCAN.nii.gz and --lung_mask_file LUNG_MASK.nii.gz (same grid)"


def _erodes(config: ClsConfig) -> bool:
    """Whether the pre-processing shrinks the lung mask (with scipy)."""
    return config.mask_intensity and config.mask_erosion_mm > 0


def _inference(task, config: ClsConfig) -> dict:
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "SaveClassificationd", "keys": "pred", "meta_keys": "image_meta_dict",
             "output_dir": "@output_dir", "filename": "predictions.csv"}]
    return {
        "imports": ["$from scipy import ndimage"] if _erodes(config) else [],
        "input_file": "",
        "lung_mask_file": "",
        "datalist": "$[{'image': @input_file, 'label_image': @lung_mask_file}] if @input_file and @lung_mask_file "
                    f"else (_ for _ in ()).throw(ValueError({NO_INPUT!r}))",
        "preprocessing": {"_target_": "Compose", "transforms": bundle_preprocessing(config)},
        "predict": "$torch.no_grad()(lambda d: dict(d, pred=@network(d['image'].as_tensor()[None].to(@device))"
                   "[0].float().cpu()))",
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def _data_format(task, config: ClsConfig, network_def: dict) -> dict:
    image = {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": network_def["in_channels"],
             "spatial_shape": list(config.roi_size), "dtype": "float32", "value_range": [0, 1],
             "is_patch_data": False, "channel_def": {"0": "image"}}
    pred = {"type": "probabilities", "format": "classes", "num_channels": network_def["out_channels"],
            "spatial_shape": [1], "dtype": "float32", "value_range": [], "is_patch_data": False,
            "channel_def": {"0": "COVID-19 (logit)"}}
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


def _io_lines(task) -> list[str]:
    return ["- Input: a chest CT volume in Hounsfield units (`--input_file`) and its lung mask on the same grid "
            "(`--lung_mask_file`, any value above 0 is lung; the project's lung_seg bundle makes one), NIfTI.",
            "- Output: `<output_dir>/predictions.csv`, one line `<scan path>,<COVID-19 probability>` per scan "
            "(probability in [0, 1]; the project calls 0.5 and above COVID-19). `output_dir` defaults to "
            "`<bundle_root>/eval`."]


def _steps(task, config: ClsConfig) -> list[str]:
    low, high = config.hu_window
    steps = [f"Orientation {config.orientation} (image and lung mask); no resampling.",
             f"Intensities clipped to [{low:g}, {high:g}] HU and scaled to [0, 1]."]
    if _erodes(config):
        steps.append(f"The lung mask is shrunk by {config.mask_erosion_mm:g} mm (voxels nearer than that to its "
                     "outside are dropped; Euclidean distance in mm), then voxels outside it are set to 0.")
    elif config.mask_intensity:
        steps.append("Voxels outside the lung mask are set to 0.")
    return steps + [f"Crop to the lung mask's bounding box plus {list(config.crop_margin)} voxels (x, y, z).",
                    f"Resize to {list(config.roi_size)} (trilinear); one network call; sigmoid of the logit."]


BUNDLE = BundleSpec(
    network="DenseNet121",
    fixed_args={"spatial_dims": 3},
    task_text="COVID-19 classification of the lung region of a chest CT",
    purpose="gives the probability that the scan shows COVID-19, from the lung region",
    reference="Huang G. et al. Densely Connected Convolutional Networks. CVPR 2017. https://arxiv.org/abs/1608.06993",
    inference=_inference,
    data_format=_data_format,
    pred_classes=lambda task: "one logit; its sigmoid is the COVID-19 probability",
    packages=lambda config: ("scipy",) if _erodes(config) else (),
    io_lines=_io_lines,
    steps=_steps,
    run_inputs=("--input_file /data/scan.nii.gz --lung_mask_file /data/scan_lung.nii.gz",),
    run_hint="--input_file SCAN.nii.gz --lung_mask_file LUNG.nii.gz",
    agreement="On phantom scans the bundle's probability equals `infer_volumetric.py`'s to 1e-6, on CPU and CUDA.",
    not_carried="; an empty lung mask, which the project refuses by name, makes the bundle fail at the resize "
                "(an empty crop).",
    extra_metadata={"label_classes": "lung mask: any value above 0 is lung (used to crop the lung region)"},
)
