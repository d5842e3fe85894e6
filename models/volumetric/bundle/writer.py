"""Write a volumetric checkpoint as a MONAI bundle, a folder a MONAI user runs without this repository::

    <bundle>/configs/metadata.json   versions, network_data_format, task, description, references
    <bundle>/configs/inference.json  MONAI-only inference: transforms, network, inferer, writer
    <bundle>/configs/logging.conf    logging for ``python -m monai.bundle run``
    <bundle>/models/model.pt         the network's state dict
    <bundle>/docs/README.md          the model, its input and output, the command, the pre-processing

The tasks with a bundle are those whose :class:`models.volumetric.task.Task` has a ``bundle``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from models.volumetric import get_task, task_names
from models.volumetric.bundle.config import LOGGING_CONF, inference_config, metadata, network_definition
from models.volumetric.bundle.readme import readme
from models.volumetric.inference import load_task_model
from utils.manifest import sha256_file
from utils.paths import refuse_overwriting_inputs

# The files export_bundle writes, relative to the bundle folder.
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "docs/README.md")


def exportable_tasks() -> tuple[str, ...]:
    """Names of the tasks that can be written as a bundle."""
    return tuple(name for name in task_names() if get_task(name).bundle is not None)


def load_exportable(path: str | Path, *, task_name: str) -> tuple[Any, Any, dict]:
    """The task, its pre-processing settings and the checkpoint, checked for export.

    The model is rebuilt and its weights loaded strictly, so a bundle is only written from a
    checkpoint that ``infer_volumetric.py`` can run.

    Args:
        path: checkpoint written by ``train_volumetric.py``.
        task_name: one of :func:`exportable_tasks`.

    Returns:
        (task, its config, checkpoint dict).

    Raises:
        ValueError: for a task without a bundle, a checkpoint of another task or builder, or a file
            that is not a volumetric checkpoint (each naming the file or task).
        FileNotFoundError: when ``path`` does not exist.
    """
    if task_name not in exportable_tasks():
        raise ValueError(f"cannot export task {task_name!r} as a bundle; choose one of {list(exportable_tasks())}")
    _, task, config, ckpt = load_task_model(path, device=torch.device("cpu"), task_name=task_name)
    if ckpt["builder"] != task.builder:
        raise ValueError(f"{path}: builder {ckpt['builder']!r} is not {task.name}'s {task.builder!r}; "
                         "only the task's own network can be written as a MONAI-only bundle")
    return task, config, ckpt


def export_bundle(*, ckpt_path: str | Path, task_name: str, out_dir: str | Path, version: str = "0.1.0",
                  authors: str = "covid-ct project", copyright: str = "Copyright (c) the covid-ct project authors",
                  overwrite: bool = False) -> Path:
    """Write the bundle of a checkpoint and check that MONAI rebuilds the network from it.

    Args:
        ckpt_path: checkpoint written by ``train_volumetric.py``.
        task_name: a task with a bundle (:func:`exportable_tasks`); must be the checkpoint's task.
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
    network_def = network_definition(task, ckpt["builder_kwargs"])
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
    print(f"{task.name} bundle -> {out}\nrun it: cd {out} && python -m monai.bundle run "
          f"--config_file configs/inference.json {task.bundle.run_hint} --output_dir OUT")
    return out


def check_bundle(bundle: str | Path) -> torch.nn.Module:
    """Parse the bundle with MONAI's ConfigParser, build ``network_def`` and load ``model.pt`` strictly.

    Returns:
        The bundle's network with its weights, in eval mode.

    Raises:
        RuntimeError: when the weights do not fit the network the config defines.
    """
    bundle = Path(bundle)
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    network = parser.get_parsed_content("network_def", instantiate=True)
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    return network.eval()


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=4) + "\n")
