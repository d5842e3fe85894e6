"""What a task supplies to be written as a MONAI bundle (``Task.bundle``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class BundleSpec:
    """A task's MONAI bundle: its network, its ``inference.json`` entries and its README text.

    Attributes:
        network: the MONAI network class the task's builder returns (``network_def``'s ``_target_``).
        fixed_args: constructor arguments the builder fixes (e.g. ``spatial_dims``).
        task_text: metadata ``task``, one line.
        purpose: what the network does, completing "A 3D <network> that ...".
        reference: the network's paper.
        inference: ``f(task, config) -> dict`` of the ``inference.json`` entries that depend on the
            task: ``imports``, its inputs, ``datalist``, ``preprocessing``, ``predict``,
            ``postprocessing`` (and whatever those refer to).
        data_format: ``f(task, config, network_def) -> dict``, metadata ``network_data_format``.
        pred_classes: ``f(task) -> str``, metadata ``pred_classes``.
        packages: ``f(config) -> names`` of the packages the bundle needs besides MONAI and nibabel.
        io_lines: ``f(task) -> lines`` of the README's "Input and output".
        steps: ``f(task, config) -> lines`` of the README's "Pre-processing".
        run_inputs: the input flags of each README command, e.g. ``("--input_file /data/scan.nii.gz",)``.
        run_hint: the input flags printed after export, e.g. ``"--input_file SCAN.nii.gz"``.
        agreement: README text: how the bundle's output compares with the project's inference.
        not_carried: README text appended to "the bundle reads NIfTI only (...)".
        extra_metadata: further metadata keys (e.g. ``label_classes`` of a second input).
    """

    network: str
    fixed_args: dict
    task_text: str
    purpose: str
    reference: str
    inference: Callable[[Any, Any], dict]
    data_format: Callable[[Any, Any, dict], dict]
    pred_classes: Callable[[Any], str]
    packages: Callable[[Any], tuple[str, ...]]
    io_lines: Callable[[Any], list[str]]
    steps: Callable[[Any, Any], list[str]]
    run_inputs: tuple[str, ...]
    run_hint: str
    agreement: str
    not_carried: str = "."
    extra_metadata: dict = field(default_factory=dict)


def plain(value: Any) -> Any:
    """Tuples to lists, recursively (JSON)."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
