"""The canonical commands that the scripts' docstrings (their --help) and README.md show, checked as written.

A command is a ``python <script>.py ...`` line (continuation lines joined) in a script's module
docstring or in one of README.md's bash blocks. Each one must parse with the script's own parser, and
every path it names under ``data/phantom`` must exist in a phantom of the layout that
``make_synthetic_data.py`` writes (tiny sizes); a volumetric datalist must list existing files for the
section used, with label files for segmentation tasks. The cheap commands also run end to end on tiny
inputs placed where the command expects them; training commands are covered by their own tests.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from datasets.synthetic import generate_dataset
from models.mask_net import covid_mask_net
from models.volumetric import get_task
from models.volumetric.common import load_cases
from utils.checkpoint import load_checkpoint, make_checkpoint, resolve_builder, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PHANTOM = "data/phantom"
TINY = dict(n_patients=6, n_seg_patients=3, slices_per_patient=1, image_size=64, n_volumes=12,
            volume_shape=(24, 24, 8), n_abdomen=2, abdomen_shape=(16, 16, 8), workers=1)
TINY_FLAGS = [word for key, value in TINY.items()
              for word in (f"--{key}", *map(str, value if isinstance(value, tuple) else [value]))] + ["--no_montage"]
SEG_BUILDER, CLS_BUILDER = "models.mask_net.maskrcnn_resnet_fpn", "models.mask_net.covid_mask_net"


def python_commands(text: str) -> list[str]:
    """The ``python <script>.py ...`` commands in ``text``, each with its continuation lines joined."""
    commands, current = [], None
    for line in text.splitlines():
        part = line.strip()
        if current is None and not re.match(r"python \w+\.py(\s|$)", part):
            continue
        current = part if current is None else f"{current} {part}"
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = None
    return commands


def script_commands(path: Path) -> list[str]:
    """Commands in the module docstring of the script at ``path``."""
    return python_commands(ast.get_docstring(ast.parse(path.read_text())) or "")


def readme_commands() -> list[str]:
    """Commands in README.md's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [command for block in blocks for command in python_commands(block)]


SCRIPTS = sorted(p for p in ROOT.glob("*.py") if "def get_args_parser" in p.read_text())
COMMANDS = [(f"{p.name} docstring", c) for p in SCRIPTS for c in script_commands(p)] + [
    ("README.md", c) for c in readme_commands()]
IDS = [f"{'README' if source == 'README.md' else 'docstring'}:{shlex.split(c)[1]}:{i}"
       for i, (source, c) in enumerate(COMMANDS)]


def split(command: str) -> tuple[str, list[str]]:
    """Script name and arguments of a command (a trailing ``# comment`` dropped)."""
    words = shlex.split(command, comments=True)
    return words[1], words[2:]


def parse(command: str):
    """The command's arguments as parsed by the script's own parser; a refusal fails the test."""
    script, argv = split(command)
    parser = importlib.import_module(Path(script).stem).get_args_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{script}'s parser refuses its canonical command (its message is above): {command}")


def phantom_paths(argv: list[str]) -> list[str]:
    """Arguments (or ``--flag=value`` values) that name a path under ``data/phantom``."""
    values = [a.split("=", 1)[-1] for a in argv]
    return [v for v in values if v == PHANTOM or v.startswith(PHANTOM + "/")]


def check_datalist(args, workspace: Path) -> None:
    """A phantom datalist must list existing files in the section(s) used, with label files for segmentation."""
    if not str(getattr(args, "datalist", None) or "").startswith(PHANTOM):
        return
    root = workspace / args.data_root if args.data_root else None
    sections = [args.section] if hasattr(args, "section") else ["training", "validation"]
    for section in sections:
        cases = load_cases(workspace / args.datalist, data_root=root, section=section)
        assert cases, f"{args.datalist}: section {section} is empty"
        if get_task(args.task).kind == "segmentation":
            assert all(isinstance(c["label"], str) for c in cases), \
                f"{args.datalist} has no label files, which task {args.task} needs"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder whose ``data/phantom`` is a tiny phantom in the layout of ``make_synthetic_data.py``."""
    folder = tmp_path_factory.mktemp("workspace")
    generate_dataset(folder / PHANTOM, seed=0, montage=False, **TINY)
    return folder


def test_every_script_and_the_readme_show_commands_of_their_own():
    for path in SCRIPTS:
        assert any(split(c)[0] == path.name for c in script_commands(path)), f"{path.name}: no canonical command"
    readme = {split(c)[0] for c in readme_commands()}
    assert len(readme) >= 10 and all((ROOT / script).is_file() for script in readme), readme


def test_commands_are_read_with_their_continuation_lines():
    text = "Canonical command::\n\n    python a.py --x 1 \\\n        --y data/phantom/z  # note\n\n    python -m b\n"
    (command,) = python_commands(text)
    assert split(command) == ("a.py", ["--x", "1", "--y", "data/phantom/z"])


@pytest.mark.parametrize("command,problem", [
    ("--datalist data/phantom/volumes/dataset_lesion.json --data_root data/phantom", "file not found"),
    ("--datalist data/phantom/volumes/dataset_covid.json", "has no label files"),
    ("--datalist data/phantom/volumes/dataset_lesion.json --section holdout", "no section 'holdout'")])
def test_a_datalist_that_does_not_fit_the_command_is_caught(command, problem, workspace):
    args = parse(f"python validate_volumetric.py --task lesion_seg --ckpt c.pth {command}")
    with pytest.raises((AssertionError, FileNotFoundError, ValueError), match=problem):
        check_datalist(args, workspace)


@pytest.mark.parametrize("source,command", COMMANDS, ids=IDS)
def test_command_parses_and_names_only_paths_the_phantom_has(source, command, workspace):
    args = parse(command)
    missing = [p for p in phantom_paths(split(command)[1]) if not (workspace / p).exists()]
    assert not missing, (f"{source}: {command}\nnames {missing}, which make_synthetic_data.py does not write "
                         f"(its layout: datasets/synthetic/__init__.py)")
    check_datalist(args, workspace)


def run_make_synthetic_data(module, command, workspace: Path) -> None:
    out = Path(parse(command).out)
    module.main(module.get_args_parser().parse_args(split(command)[1] + TINY_FLAGS))
    names = ("summary.json", "seg/test/imgs", "cls/test_COVIDx_CT.txt", "volumes/dataset_lesion.json",
             "abdomen/dataset.json")
    assert all((out / name).exists() for name in names)


def run_convert_dicom(module, command, workspace: Path) -> None:
    from tests.helpers import write_series

    args = parse(command)
    args.input_dir.mkdir(parents=True)
    write_series(args.input_dir, n=3)
    assert [p.suffixes for p in module.main(args)] == [[".nii", ".gz"]]


def run_convert_checkpoint(module, command, workspace: Path) -> None:
    from tests.helpers import CLS_MODULE, seg_model, write_original

    args = parse(command)
    Path(args.old).parent.mkdir(parents=True, exist_ok=True)
    classifier = "classification" in Path(args.old).name
    if classifier:
        torch.manual_seed(0)
        model = covid_mask_net(backbone_name="resnet18", truncation=1, num_classes=2, roi_batch_size=8, s_features=16)
        write_original(Path(args.old), model, anchor_module=CLS_MODULE)
    else:
        write_original(Path(args.old), seg_model())
    assert load_checkpoint(module.main(args))["builder"] == (CLS_BUILDER if classifier else SEG_BUILDER)


def architecture(args) -> dict:
    """Backbone and truncation that the command names (resnet18 and 1 where it names none)."""
    truncation = 1 if args.truncation is None else args.truncation
    return dict(backbone_name=args.backbone_name or "resnet18", truncation=truncation)


def save_untrained(path: str, builder: str, kwargs: dict, **extra) -> None:
    """An untrained model of ``builder`` for 64-px slices, saved at ``path`` as a checkpoint."""
    kwargs = {**kwargs, "min_size": 64, "max_size": 64}
    torch.manual_seed(0)
    model = resolve_builder(builder)(**kwargs)
    save_checkpoint(make_checkpoint(model=model, builder=builder, builder_kwargs=kwargs, epoch=0, **extra), path)


def run_segmentation_script(module, command, workspace: Path) -> None:
    args = parse(command)
    mask_type = args.mask_type or "merge"
    save_untrained(args.ckpt, SEG_BUILDER, {**architecture(args), "num_classes": 3 if mask_type == "both" else 2},
                   mask_type=mask_type)
    module.main(args)
    written = "predictions.json" if hasattr(args, "no_overlays") else "metrics.json"
    assert (Path(args.save_dir) / written).is_file()


def run_evaluate_classifier(module, command, workspace: Path) -> None:
    args = parse(command)
    sizes = dict(num_classes=args.num_classes or 2, roi_batch_size=args.roi_batch_size or 8,
                 s_features=args.s_features or 16)
    save_untrained(args.ckpt, CLS_BUILDER, {**architecture(args), **sizes})
    args.no_progress = True
    module.main(args)
    assert (Path(args.save_dir) / "metrics.json").is_file()


RUNNERS = {"make_synthetic_data.py": run_make_synthetic_data, "convert_dicom.py": run_convert_dicom,
           "convert_checkpoint.py": run_convert_checkpoint, "inference_segmentation.py": run_segmentation_script,
           "evaluation_mean_ap.py": run_segmentation_script, "evaluate_classifier.py": run_evaluate_classifier}
RUNNABLE = [(pair, i) for pair, i in zip(COMMANDS, IDS) if split(pair[1])[0] in RUNNERS]


@pytest.mark.parametrize("source,command", [pair for pair, _ in RUNNABLE], ids=[i for _, i in RUNNABLE])
def test_cheap_command_runs_end_to_end(source, command, workspace, tmp_path, monkeypatch):
    """Run in a fresh folder that links the shared phantom as ``data/phantom`` (not for the command that writes it)."""
    script, _ = split(command)
    if script != "make_synthetic_data.py":
        (tmp_path / PHANTOM).parent.mkdir(parents=True)
        os.symlink(workspace / PHANTOM, tmp_path / PHANTOM, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    RUNNERS[script](importlib.import_module(Path(script).stem), command, workspace)


# ------------------------------------------------------------ the 2D scripts: parser + one library call
# Script -> (its pipeline config, the arguments it requires).
ENTRY_POINTS = {
    "train_segmentation.py": ("models.mask_net.workflows.segmentation.SegmentationTrainConfig", {}),
    "train_classifier.py": ("models.mask_net.workflows.classifier.ClassifierTrainConfig", {}),
    "inference_segmentation.py": ("models.mask_net.workflows.segmentation.SegmentationInferenceConfig",
                                  {"ckpt": "c.pth"}),
    "evaluation_mean_ap.py": ("models.mask_net.workflows.evaluation.MeanAPConfig", {"ckpt": "c.pth"}),
    "evaluate_classifier.py": ("models.mask_net.workflows.classifier_evaluation.ClassifierEvalConfig",
                               {"ckpt": "c.pth"}),
    "convert_checkpoint.py": ("models.mask_net.workflows.conversion.ConversionConfig", {"old": "a", "new": "b"}),
}
ROOT_SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def _config_class(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _argv(required: dict) -> list[str]:
    positional = [required[k] for k in ("old", "new") if k in required]
    return positional + [word for k, v in required.items() if k not in ("old", "new") for word in (f"--{k}", v)]


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_script_is_a_parser_and_one_call_and_imports_no_script(script):
    tree = ast.parse((ROOT / script).read_text())
    functions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert functions == ["get_args_parser", "main"], functions
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & (ROOT_SCRIPTS - {Path(script).stem}), imported
    assert len((ROOT / script).read_text().splitlines()) <= 120


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_every_flag_reaches_the_config_with_the_same_default(script):
    """The parser's defaults are the config's: a Python caller and the command line run the same pipeline."""
    from utils.cli import config_from_args

    config_class, required = _config_class(ENTRY_POINTS[script][0]), ENTRY_POINTS[script][1]
    args = importlib.import_module(Path(script).stem).get_args_parser().parse_args(_argv(required))
    assert set(vars(args)) == set(config_class.__dataclass_fields__), set(vars(args)) ^ set(
        config_class.__dataclass_fields__)
    assert config_from_args(config_class, args) == config_class(**required)


@pytest.mark.parametrize("script,names", [
    ("train_segmentation.py", [("--lrate", "--lr"), ("--num_epochs", "--epochs"), ("--num_workers", "--workers"),
                               ("--save_dir", "--output"), ("--save_dir", "--out")]),
    ("train_classifier.py", [("--lrate", "--lr"), ("--num_epochs", "--epochs"), ("--num_workers", "--workers"),
                             ("--save_dir", "--out")]),
    ("evaluate_classifier.py", [("--num_workers", "--workers"), ("--save_dir", "--output")]),
    ("evaluation_mean_ap.py", [("--save_dir", "--out")]),
    ("inference_segmentation.py", [("--save_dir", "--output")]),
])
def test_the_3d_track_flag_names_are_aliases(script, names):
    parser = importlib.import_module(Path(script).stem).get_args_parser()
    required = _argv(ENTRY_POINTS[script][1])
    for original, alias in names:
        value = "0.5" if original == "--lrate" else "3"
        assert parser.parse_args([*required, original, value]) == parser.parse_args([*required, alias, value])
