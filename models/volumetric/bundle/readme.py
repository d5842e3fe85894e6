"""``docs/README.md`` of a MONAI bundle: the model, its input and output, the command, the pre-processing."""
from __future__ import annotations

from typing import Any

RUN_COMMAND = "python -m monai.bundle run --config_file configs/inference.json"


def readme(task, config: Any, meta: dict, *, network_def: dict) -> str:
    """The README text; the task's parts come from its :class:`~models.volumetric.bundle.spec.BundleSpec`."""
    spec = task.bundle
    lines = _model_lines(meta, network_def) + ["", "## Input and output", "", *spec.io_lines(task), ""]
    lines += _run_lines(spec, packages=list(meta["required_packages_version"])) + ["", "## Pre-processing", ""]
    lines += [f"- {step}" for step in spec.steps(task, config)]
    lines += ["", "## Agreement with the project's inference", "", spec.agreement, "",
              "Not carried over: the project reads DICOM series and checks that intensities look like HU; the "
              "bundle reads NIfTI only (convert DICOM first, e.g. with the project's convert_dicom.py)"
              + spec.not_carried, ""]
    return "\n".join(lines)


def _model_lines(meta: dict, network_def: dict) -> list[str]:
    source = meta["source_checkpoint"]
    network = next(iter(meta["network_data_format"]["inputs"].values()))
    return [f"# {meta['name']}", "", meta["description"], "", "## Model", "",
            f"- Network: MONAI `monai.networks.nets.{network_def['_target_']}`, weights in `models/model.pt` "
            "(state dict).",
            f"- Source checkpoint: task `{source['task']}`, epoch {source['epoch']}, sha256 "
            f"`{source.get('sha256', '?')}`.",
            f"- Network input: {network['num_channels']} channel, {network['spatial_shape']} voxels, in [0, 1].",
            f"- Intended use: {meta['intended_use']}"]


def _run_lines(spec, *, packages: list[str]) -> list[str]:
    return ["## Run", "", f"From the bundle folder (MONAI with {', '.join(packages)}; "
            "`python -m monai.bundle` needs the `fire` package):", "", "```bash",
            *(f"{RUN_COMMAND} {inputs} --output_dir out" for inputs in spec.run_inputs), "```", "",
            "Add `--device cpu` to stay on the CPU (default: the first GPU when there is one). From another "
            "folder, give the full path of `configs/inference.json` and add `--bundle_root PATH_OF_THE_BUNDLE`."]
