"""The configs of a MONAI bundle: ``configs/inference.json``, ``configs/metadata.json``, ``logging.conf``.

The frame (device, weights, network, dataset, run) is the same for every task; the entries that
depend on the task (inputs, transforms, inferer, predict, post-processing) and its metadata texts
come from its :class:`~models.volumetric.bundle.spec.BundleSpec`.
"""
from __future__ import annotations

import inspect
from importlib.metadata import version as package_version
from typing import Any

import monai
import nibabel
import numpy as np
import torch

from models.volumetric.bundle.spec import plain
from utils.checkpoint import resolve_builder

META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
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


def network_definition(task, builder_kwargs: dict) -> dict:
    """The ``network_def`` entry: the MONAI class the task's builder returns and all its arguments.

    The builder's own defaults are written out, so the bundle does not depend on MONAI's defaults
    (AH-Net's ``psp_block_num`` default differs from ours, for one).

    Raises:
        ValueError: for keyword arguments the builder does not have.
    """
    parameters = inspect.signature(resolve_builder(task.builder)).parameters
    unknown = sorted(set(builder_kwargs) - set(parameters))
    if unknown:
        raise ValueError(f"builder {task.builder} has no arguments {unknown}")
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {"_target_": task.bundle.network, **task.bundle.fixed_args, **plain({**defaults, **builder_kwargs})}


def inference_config(task, config: Any, *, network_def: dict) -> dict:
    """``configs/inference.json``: the shared frame around the task's own entries."""
    body = task.bundle.inference(task, config)
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


def metadata(task, config: Any, ckpt: dict, *, network_def: dict, version: str, authors: str,
             copyright: str) -> dict:
    """``configs/metadata.json``: the MONAI bundle specification's keys plus the source checkpoint."""
    spec = task.bundle
    optional = {"nibabel": nibabel.__version__, **{name: package_version(name) for name in spec.packages(config)}}
    return {
        "schema": META_SCHEMA,
        "version": version,
        "changelog": {version: f"exported from a {task.name} checkpoint (epoch {ckpt['epoch']})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": optional,
        "name": f"covid_ct_{task.name}",
        "task": spec.task_text,
        "description": f"A 3D {network_def['_target_']} that {spec.purpose}; trained with the covid-ct research "
                       "codebase.",
        "authors": authors,
        "copyright": copyright,
        "intended_use": "Research only; not for clinical diagnosis.",
        "data_type": "nifti",
        "image_classes": "one-channel CT in Hounsfield units, windowed and scaled to [0, 1] by the pre-processing",
        **spec.extra_metadata,
        "pred_classes": spec.pred_classes(task),
        "eval_metrics": {k: v for k, v in (ckpt.get("metrics") or {}).items()
                         if k.startswith("val_") and isinstance(v, (int, float))},
        "references": [spec.reference],
        "network_data_format": spec.data_format(task, config, network_def),
        "source_checkpoint": {"task": task.name, "builder": ckpt["builder"], "epoch": ckpt["epoch"],
                              "task_config": config.to_dict()},
    }
