"""The pipeline's models: where each checkpoint comes from, and loading them once for many scans."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.checkpoint import load_checkpoint
from utils.cli import resolve_device
from utils.manifest import MissingModelError, resolve_model, sha256_file

DEFAULT_MODELS_DIR = "pretrained_models"


@dataclass(frozen=True)
class ModelSpec:
    """How the pipeline finds one model.

    Attributes:
        flag: the ``analyze_scan.py`` flag that names its checkpoint.
        entry: its name in the models folder's manifest.
        trainer: the command(s) that train it, for the message when it is missing.
    """

    flag: str
    entry: str
    trainer: str


# Pipeline model -> how it is found, in the order the pipeline runs them.
MODELS = {"lung_seg": ModelSpec("lung_ckpt", "lung_seg", "train_volumetric.py --task lung_seg"),
          "lesion_seg": ModelSpec("lesion_ckpt", "lesion_seg", "train_volumetric.py --task lesion_seg"),
          "covid_cls": ModelSpec("covid3d_ckpt", "covid_cls", "train_volumetric.py --task covid_cls"),
          "mask_net_classifier": ModelSpec("covid2d_ckpt", "mask_net_classifier",
                                           "train_segmentation.py, then train_classifier.py")}
CLASSIFIERS = ("covid_cls", "mask_net_classifier")  # the models a run may leave out


def resolve_model_paths(*, models_dir: str | os.PathLike = DEFAULT_MODELS_DIR,
                        checkpoints: dict[str, str | os.PathLike | None] | None = None,
                        skip: tuple[str, ...] | list[str] = ()) -> dict[str, Path]:
    """Checkpoint path of every model the run needs: the one given, else the manifest's entry.

    Args:
        models_dir: folder with ``manifest.json``, used for each model not in ``checkpoints``.
        checkpoints: model name (a key of :data:`MODELS`) -> checkpoint path; None values are ignored.
        skip: classifiers (of :data:`CLASSIFIERS`) to leave out.

    Returns:
        Model name -> checkpoint path, in the order of :data:`MODELS`.

    Raises:
        MissingModelError: naming the model, where it was looked for and how to produce it.
        ValueError: for an unknown model name, or a classifier in ``skip`` that cannot be skipped.
    """
    checkpoints = {k: v for k, v in (checkpoints or {}).items() if v}
    _check_names(checkpoints, skip)
    paths = {}
    for name, spec in MODELS.items():
        if name in skip:
            continue
        if name in checkpoints:
            paths[name] = _given(name, spec, checkpoints[name])
            continue
        try:
            paths[name] = resolve_model(models_dir, spec.entry)
        except MissingModelError as err:
            raise MissingModelError(f"{name} model missing: pass --{spec.flag} CKPT (checkpoints={{'{name}': CKPT}} "
                                    f"from Python; trained with {spec.trainer}; see README.md), or register it in "
                                    f"{models_dir}/. {err}") from err
    return paths


def _check_names(checkpoints: dict, skip) -> None:
    unknown = sorted(set(checkpoints) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; the pipeline's models are {list(MODELS)}")
    wrong = sorted(set(skip) - set(CLASSIFIERS))
    if wrong:
        raise ValueError(f"only the classifiers {list(CLASSIFIERS)} can be skipped, not {wrong}")


def _given(name: str, spec: ModelSpec, path: str | os.PathLike) -> Path:
    if not Path(path).is_file():
        raise MissingModelError(f"{name}: --{spec.flag} {path} does not exist")
    return Path(path)


@dataclass
class LoadedModel:
    """A network in eval mode with the settings its checkpoint carries.

    Attributes:
        model: the network on the models' device.
        task: the volumetric task (None for the 2D classifier).
        config: the task's pre-processing settings (None for the 2D classifier).
        card: what the report says about the model (:func:`model_card`), from the checkpoint just read.
    """

    model: torch.nn.Module
    task: object | None = None
    config: object | None = None
    card: dict | None = None


class Models:
    """The pipeline's models on one device; each checkpoint is loaded once and kept for every scan.

    Attributes:
        paths: model name -> checkpoint path, in pipeline order (only the models the run uses).
        device: where the networks run.
        amp: run the segmentation networks and the 2D classifier in mixed precision (:mod:`utils.amp`);
            the 3D classifier stays float32 for its GradCAM map.
    """

    def __init__(self, paths: dict[str, Path], *, device: torch.device, amp: bool = False):
        self.paths, self.device, self.amp = dict(paths), device, amp
        self._loaded: dict[str, LoadedModel] = {}
        self._cards: dict[str, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name``, loading its checkpoint on first use.

        Raises:
            KeyError: when the run does not use that model.
            FileNotFoundError, ValueError: naming the checkpoint when it cannot be loaded.
        """
        if name not in self._loaded:
            self._loaded[name] = _load(name, self.paths[name], device=self.device, amp=self.amp)
            self._cards[name] = self._loaded[name].card
        return self._loaded[name]

    def load_all(self) -> Models:
        """Load every model now (errors surface here rather than during the first scan); returns self."""
        for name in self.paths:
            self.get(name)
        return self

    def cards(self) -> list[dict]:
        """What a report says about each model (see :func:`model_card`), computed once (when loaded, if it was)."""
        for name, path in self.paths.items():
            if name not in self._cards:
                self._cards[name] = model_card(name, path)
        return [self._cards[name] for name in self.paths]


def load_models(models_dir: str | os.PathLike = DEFAULT_MODELS_DIR, *, device: str | torch.device = "cpu",
                checkpoints: dict[str, str | os.PathLike | None] | None = None,
                skip: tuple[str, ...] | list[str] = (), lazy: bool = False, amp: bool = False) -> Models:
    """Find the pipeline's checkpoints and load them, to analyse any number of scans.

    Args:
        models_dir: folder with ``manifest.json`` (see ``pretrained_models/README.md``), used for
            each model not in ``checkpoints``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        checkpoints: model name (``lung_seg``, ``lesion_seg``, ``covid_cls``, ``mask_net_classifier``)
            -> checkpoint path, overriding the manifest.
        skip: classifiers to leave out (``covid_cls``, ``mask_net_classifier``).
        lazy: load each checkpoint when it is first needed instead of now; ``analyze_scan.py`` uses
            this so that a bad scan is reported before any model is loaded.
        amp: mixed precision (see :class:`Models`).

    Raises:
        MissingModelError: naming a missing model and how to produce it (before anything is loaded).
        ValueError: for an unusable device or a checkpoint of the wrong kind.
    """
    device = resolve_device(str(device))
    models = Models(resolve_model_paths(models_dir=models_dir, checkpoints=checkpoints, skip=skip), device=device,
                    amp=amp)
    return models if lazy else models.load_all()


def _load(name: str, path: Path, *, device: torch.device, amp: bool = False) -> LoadedModel:
    """Rebuild model ``name`` from its checkpoint, in eval mode on ``device`` (the 2D classifier under
    :func:`utils.amp.for_inference` with ``amp``; the volumetric models take ``amp`` where they run)."""
    if name == "mask_net_classifier":
        from models.mask_net.workflows.classifier_evaluation import load_classifier

        model, ckpt = load_classifier(str(path), flags={}, device=device, amp=amp)
        return LoadedModel(model, card=model_card(name, path, ckpt))
    from models.volumetric.inference import load_task_model

    model, task, config, ckpt = load_task_model(path, device=device, task_name=name)
    return LoadedModel(model, task, config, card=model_card(name, path, ckpt))


def model_card(name: str, path: Path, ckpt: dict | None = None) -> dict:
    """What the report says about a model: its file, hash and how it was built and trained.

    ``ckpt`` is the checkpoint when the caller has just read it (None: read it here).
    """
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    return {"name": name, "path": str(path), "sha256": sha256_file(path), "builder": ckpt["builder"],
            "builder_kwargs": ckpt["builder_kwargs"], "epoch": ckpt["epoch"], "task": ckpt.get("task", name)}
