"""export_bundle.py: MONAI bundles that reproduce infer_volumetric.py without this repository.

Each bundle is run the way a MONAI user runs it, ``python -m monai.bundle run --config_file
configs/inference.json ...`` in a subprocess whose working directory is the bundle (outside the
repository) and whose Python path does not reach the repository. Where the ``fire`` package that
MONAI's command line needs is not installed, the subprocess calls ``monai.bundle.scripts.run`` with
the same arguments instead (what ``fire`` would call).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.bundle.utils import DEFAULT_METADATA

import export_bundle
import infer_volumetric
from models.volumetric import get_task
from models.volumetric.bundle.writer import check_bundle
from models.volumetric.covid_cls import classify_case
from models.volumetric.inference import load_task_model
from tests.helpers import TINY_NET, lps_affine, write_case, write_cls_case
from utils.checkpoint import make_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TASK_CONFIG = {"lesion_seg": {"spacing": (2.0, 2.0, 4.0), "roi_size": (32, 32, 16)},
               "lung_seg": {"spacing": (2.0, 2.0, 4.0), "roi_size": (32, 32, 32)},
               "covid_cls": {"roi_size": (32, 32, 32)}}
# Keys every tensor of network_data_format must have (MONAI bundle specification).
TENSOR_KEYS = {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
               "channel_def"}


def _checkpoint(path: Path, task_name: str, **network) -> Path:
    """Randomly initialised (seed 0) checkpoint of a task with small ROIs."""
    task = get_task(task_name)
    torch.manual_seed(0)
    model, kwargs = task.build_network(**network)
    config = task.make_config(**TASK_CONFIG[task_name])
    ckpt = make_checkpoint(model=model, builder=task.builder, builder_kwargs=kwargs, epoch=3, task=task.name,
                           task_config=config.to_dict(), metrics={"epoch": 3, "val_dice": 0.5})
    return save_checkpoint(ckpt, path)


def _export(ckpt: Path, task_name: str, out: Path, *extra: str) -> Path:
    return export_bundle.main(export_bundle.get_args_parser().parse_args(
        ["--task", task_name, "--ckpt", str(ckpt), "--out", str(out), *extra]))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    """task -> (checkpoint, bundle folder), both outside the repository."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for task_name, network in (("lesion_seg", {}), ("lung_seg", {}), ("covid_cls", TINY_NET)):
        ckpt = _checkpoint(root / f"{task_name}.pth", task_name, **network)
        out[task_name] = (ckpt, _export(ckpt, task_name, root / task_name))
    return out


def _bundle_env() -> dict:
    """The caller's environment, one thread, with the repository left off PYTHONPATH."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(keep), "OMP_NUM_THREADS": "1"}


def run_bundle(bundle: Path, **overrides: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/inference.json --KEY VALUE ...`` in ``bundle``."""
    if importlib.util.find_spec("fire") is not None:
        flags = [item for key, value in overrides.items() for item in (f"--{key}", value)]
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *flags]
    else:
        call = json.dumps({"config_file": "configs/inference.json", **overrides})
        command = [sys.executable, "-c",
                   f"import json; from monai.bundle.scripts import run; run(**json.loads({call!r}))"]
    result = subprocess.run(command, cwd=bundle, env=_bundle_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_the_repository_is_not_importable_where_bundles_run(bundles):
    probe = subprocess.run([sys.executable, "-c", "import models.volumetric"], cwd=bundles["lesion_seg"][1],
                           env=_bundle_env(), capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'models.volumetric'" in probe.stderr


def _ours(ckpt: Path, task_name: str, image: str, out: Path, *extra: str) -> nib.Nifti1Image:
    infer_volumetric.main(infer_volumetric.get_args_parser().parse_args(
        ["--task", task_name, "--ckpt", str(ckpt), "--input", image, "--output", str(out), "--no_montage", *extra]))
    return nib.load(out / f"{Path(image).name.split('.')[0]}_{task_name}.nii.gz")


@pytest.mark.parametrize("task_name", ["lesion_seg", "lung_seg"])
def test_bundle_mask_equals_infer_volumetric_voxel_for_voxel(tmp_path, bundles, task_name):
    ckpt, bundle = bundles[task_name]
    case = write_case(tmp_path / "data", "scan", seed=3, label="lung", orientation="LPS", spacing=(1.3, 1.7, 3.5))
    ours = _ours(ckpt, task_name, case["image"], tmp_path / "ours")
    run_bundle(bundle, input_file=case["image"], output_dir=str(tmp_path / "bundle_out"), device="cpu")
    theirs = nib.load(tmp_path / "bundle_out" / f"scan_{task_name}.nii.gz")
    source = nib.load(case["image"])
    assert theirs.shape == ours.shape == source.shape
    np.testing.assert_allclose(theirs.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)
    mask = np.asarray(ours.dataobj)
    assert 0 < mask.sum() < mask.size  # a mask with both classes, so equality says something
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), mask)  # exact agreement
    # The windows' crop box matters here, so the bundle reproduces it rather than the whole volume.
    uncropped = _ours(ckpt, task_name, case["image"], tmp_path / "uncropped", "--crop_region", "none")
    assert not np.array_equal(np.asarray(uncropped.dataobj), mask)


def test_covid_cls_bundle_gives_infer_volumetric_probability(tmp_path, bundles):
    ckpt, bundle = bundles["covid_cls"]
    case, _, _ = write_cls_case(tmp_path, "scan", affine=lps_affine())
    (tmp_path / "dataset.json").write_text(json.dumps({"testing": [case]}))
    rows = infer_volumetric.main(infer_volumetric.get_args_parser().parse_args(
        ["--task", "covid_cls", "--ckpt", str(ckpt), "--input", str(tmp_path / "dataset.json"),
         "--output", str(tmp_path / "ours")]))
    model, _, config, _ = load_task_model(ckpt, device=torch.device("cpu"))
    exact = classify_case(case, model=model, config=config, device=torch.device("cpu"))["probability"]
    run_bundle(bundle, input_file=case["image"], lung_mask_file=case["label_image"],
               output_dir=str(tmp_path / "bundle_out"), device="cpu")
    with (tmp_path / "bundle_out" / "predictions.csv").open() as handle:
        (row,) = list(csv.reader(handle))
    assert row[0] == case["image"]
    assert float(row[1]) == pytest.approx(exact, abs=1e-6)
    assert round(float(row[1]), 6) == rows[0]["probability"]


def test_bundle_parses_and_its_network_is_the_checkpoints(bundles):
    ckpt, bundle = bundles["lesion_seg"]
    network = check_bundle(bundle)
    ours, _, _, _ = load_task_model(ckpt, device=torch.device("cpu"))
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(network(x), ours(x))
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    assert tuple(parser.get_parsed_content("inferer").roi_size) == (32, 32, 16)
    # Channels-last weights as infer_volumetric.py uses them; a contiguous layout rounds differently.
    weight = next(p for p in parser.get_parsed_content("network").parameters() if p.ndim == 5 and p.shape[1] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu")
    assert (bundle / "docs" / "README.md").read_text().count("python -m monai.bundle run") == 2


@pytest.mark.parametrize("task_name", ["lesion_seg", "lung_seg", "covid_cls"])
def test_metadata_has_the_specification_keys(bundles, task_name):
    meta = json.loads((bundles[task_name][1] / "configs" / "metadata.json").read_text())
    assert set(DEFAULT_METADATA) <= set(meta)
    assert meta["monai_version"] and meta["pytorch_version"] == torch.__version__.split("+")[0]
    for tensor in (*meta["network_data_format"]["inputs"].values(), *meta["network_data_format"]["outputs"].values()):
        assert TENSOR_KEYS <= set(tensor)
    assert meta["source_checkpoint"]["epoch"] == 3 and meta["eval_metrics"] == {"val_dice": 0.5}
    state = torch.load(bundles[task_name][1] / "models" / "model.pt", weights_only=True)
    assert set(state) == set(torch.load(bundles[task_name][0], weights_only=True)["model"])


def test_lung_postprocessing_keeps_the_two_largest_components_as_the_task_does(bundles):
    parser = ConfigParser()
    parser.read_config(bundles["lung_seg"][1] / "configs" / "inference.json")
    keep = parser.get_parsed_content("postprocessing").transforms[3]  # after softmax, Invertd and argmax
    labels = torch.zeros(1, 20, 20, 6)
    labels[0, 1:6, 1:6, 1:5], labels[0, 10:18, 2:9, 1:5], labels[0, 2:4, 14:16, 2:3] = 1, 1, 1  # three blobs
    task = get_task("lung_seg")
    expected = task.postprocessing(task.default_config)(labels.clone())
    assert 0 < expected.sum() < labels.sum()
    torch.testing.assert_close(keep({"pred": labels.clone()})["pred"].as_tensor(), expected.as_tensor())


def test_dataset_dir_input_and_missing_input(tmp_path, bundles):
    from monai.bundle.scripts import run

    ckpt, bundle = bundles["lesion_seg"]
    for i in range(2):
        write_case(tmp_path / "scans", f"scan{i}", seed=i, label="lung")
    for label in (tmp_path / "scans").glob("*_lung.nii.gz"):
        label.unlink()
    run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False, bundle_root=str(bundle),
        dataset_dir=str(tmp_path / "scans"), output_dir=str(tmp_path / "out"), device="cpu")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["scan0_lesion_seg.nii.gz", "scan1_lesion_seg.nii.gz"]
    ours = _ours(ckpt, "lesion_seg", str(tmp_path / "scans" / "scan1.nii.gz"), tmp_path / "ours")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "scan1_lesion_seg.nii.gz").dataobj),
                                  np.asarray(ours.dataobj))
    with pytest.raises(RuntimeError) as info:
        run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False, bundle_root=str(bundle))
    assert "no input scan: pass --input_file" in "".join(str(e) for e in _causes(info.value))


def _causes(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__


def test_export_errors_name_the_problem(tmp_path, bundles):
    lesion_ckpt = bundles["lesion_seg"][0]
    with pytest.raises(ValueError, match=r"checkpoint is for task 'lesion_seg', not 'lung_seg'"):
        _export(lesion_ckpt, "lung_seg", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pth"):
        _export(tmp_path / "missing.pth", "lesion_seg", tmp_path / "b")
    with pytest.raises(ValueError, match="cannot export task 'ssl_pretrain'"):
        export_bundle.export_bundle(ckpt_path=lesion_ckpt, task_name="ssl_pretrain", out_dir=tmp_path / "c")
    with pytest.raises(SystemExit):
        export_bundle.get_args_parser().parse_args(["--task", "organ_seg", "--ckpt", "x", "--out", "y"])
    plain = save_checkpoint(make_checkpoint(model={}, builder="models.volumetric.lesion_seg.build_network",
                                            builder_kwargs={}, epoch=0), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="plain.pth: not a volumetric checkpoint"):
        _export(plain, "lesion_seg", tmp_path / "d")
    with pytest.raises(ValueError, match="folder exists and is not empty"):
        _export(lesion_ckpt, "lesion_seg", bundles["lesion_seg"][1])


def test_bundle_that_would_replace_its_checkpoint_is_refused(tmp_path):
    """A checkpoint kept as the bundle's models/model.pt is not overwritten, even with --overwrite."""
    ckpt = _checkpoint(tmp_path / "bundle" / "models" / "model.pt", "lesion_seg")
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match="model.pt is the input .*model.pt"):
        _export(ckpt, "lesion_seg", tmp_path / "bundle", "--overwrite")
    assert ckpt.read_bytes() == before and not (tmp_path / "bundle" / "configs").exists()


def test_checkpoint_with_another_builder_is_refused(tmp_path):
    covid = get_task("covid_cls")
    model, kwargs = covid.build_network(**TINY_NET)
    ckpt = make_checkpoint(model=model, builder=covid.builder, builder_kwargs=kwargs, epoch=0, task="lesion_seg",
                           task_config=get_task("lesion_seg").make_config(**TASK_CONFIG["lesion_seg"]).to_dict())
    path = save_checkpoint(ckpt, tmp_path / "odd.pth")
    with pytest.raises(ValueError,
                       match=r"odd.pth: builder 'models.volumetric.covid_cls.build_network' is not lesion_seg's"):
        _export(path, "lesion_seg", tmp_path / "out")


@pytest.mark.parametrize("crop_region", ["lung", "body"])
@pytest.mark.parametrize("margin, roi", [(0, (48, 48, 8)), (3, (16, 16, 24)), (12, (32, 32, 16))])
def test_bundle_crops_to_the_region_infer_volumetric_windows_cover(tmp_path, crop_region, margin, roi):
    """The bundle's ``crop_select`` marks exactly :func:`window_region` of :func:`crop_box`."""
    from models.volumetric.sliding_window import crop_box, window_region
    from tests.helpers import chest_phantom

    config = get_task("lesion_seg").make_config(crop_region=crop_region, crop_margin=margin, roi_size=roi)
    ckpt = tmp_path / "lesion.pth"
    torch.manual_seed(0)
    model, kwargs = get_task("lesion_seg").build_network()
    save_checkpoint(make_checkpoint(model=model, builder=get_task("lesion_seg").builder, builder_kwargs=kwargs,
                                    epoch=1, task="lesion_seg", task_config=config.to_dict(), metrics={}), ckpt)
    parser = ConfigParser()
    parser.read_config(_export(ckpt, "lesion_seg", tmp_path / "bundle") / "configs" / "inference.json")
    volume = chest_phantom(seed=3, shape=(64, 64, 12))
    image = torch.as_tensor((volume["image"].astype("float32") + 1000.0) / 1500.0).clamp(0, 1)[None]
    want = torch.zeros(image.shape, dtype=torch.bool)
    want[(slice(None), *window_region(crop_box(image, config=config), image.shape[1:], roi))] = True
    got = parser.get_parsed_content("crop_select")(image)
    assert got.shape == want.shape and torch.equal(got, want)
    assert not want.all() or crop_region == "body"  # the lung cases crop something
