"""analyze_scan.py and models.analysis end to end on tiny phantoms: outputs on the input grid, quantities,
report, bad input, and the library called from Python."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import analyze_scan
from datasets.conventions import LUNG_WINDOW, hu_to_png
from models.analysis import steps as analysis_steps
from tests.helpers import analysis_checkpoints, analysis_flags, chest_phantom
from utils import amp
from utils.manifest import load_manifest, register
from utils.quantify import voxel_volume_ml


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Randomly initialised, tiny checkpoints of the four models, in the project's schema."""
    return analysis_checkpoints(tmp_path_factory.mktemp("models"))


_flags = analysis_flags


def _run(argv: list[str]) -> dict:
    return analyze_scan.main(analyze_scan.get_args_parser().parse_args(argv))


def _write_scan(path, *, orientation="LPS", seed=0):
    volume = chest_phantom(seed=seed, orientation=orientation)
    nib.save(nib.Nifti1Image(volume["image"].astype(np.int16), volume["affine"]), path)
    return volume, nib.load(path).affine


def test_outputs_are_on_the_input_grid_and_the_report_matches_the_masks(tmp_path, checkpoints):
    volume, affine = _write_scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    report = _run([str(tmp_path / "scan.nii.gz"), "--out", str(out), "--models_dir", str(tmp_path / "none"),
                   *_flags(checkpoints)])
    masks = {}
    for name in ("lungs", "lesions"):
        image = nib.load(out / f"{name}.nii.gz")
        assert image.shape == volume["image"].shape
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        masks[name] = np.asarray(image.dataobj)
    ml = voxel_volume_ml(affine)
    quantities = json.loads((out / "report.json").read_text())["quantities"]
    assert quantities["left"]["lung_ml"] == pytest.approx((masks["lungs"] == 1).sum() * ml)
    assert quantities["total"]["ggo_ml"] == pytest.approx(((masks["lesions"] == 1) & (masks["lungs"] > 0)).sum() * ml)
    assert set(report["covid"]) == {"covid_cls", "mask_net_classifier"}
    assert all(0.0 <= c["probability"] <= 1.0 for c in report["covid"].values())
    assert [m["name"] for m in report["models"]] == ["lung_seg", "lesion_seg", "covid_cls", "mask_net_classifier"]
    assert all(len(m["sha256"]) == 64 for m in report["models"])
    written = json.loads((out / "report.json").read_text())
    assert written["warnings"] == []  # a clean run says so
    assert set(written["seconds"]) == {"reading the scan", "lung segmentation", "lesion segmentation",
                                       "3D COVID-19 classifier", "2D COVID-CT-Mask-Net classifier", "report"}
    page = (out / "report.html").read_text()
    for picture in ("montage_lungs.png", "montage_lesions.png", "slice_profile.png", "scan_saliency.png"):
        assert (out / picture).stat().st_size > 1000 and picture in page


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_quantities_from_known_masks(tmp_path, monkeypatch, checkpoints, orientation):
    """With the segmentation step giving the phantom's truth, the report gives the truth's volumes."""
    volume, affine = _write_scan(tmp_path / "scan.nii.gz", orientation=orientation, seed=4)
    truth = {"lung_seg": (volume["lung"] > 0).astype(np.uint8), "lesion_seg": (volume["lesion"] > 0).astype(np.uint8)}
    monkeypatch.setattr(analysis_steps, "segment", lambda name, *a, **k: (truth[name], affine))
    report = _run([str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out"), *_flags(checkpoints),
                   "--skip", "covid_cls", "mask_net_classifier"])
    q, ml = report["quantities"], voxel_volume_ml(affine)
    assert q["left"]["lung_ml"] == pytest.approx((volume["lung"] == 1).sum() * ml)
    assert q["right"]["lung_ml"] == pytest.approx((volume["lung"] == 2).sum() * ml)
    assert q["total"]["lesion_ml"] == pytest.approx((volume["lesion"] > 0).sum() * ml)
    assert q["total"]["ggo_ml"] == pytest.approx((volume["lesion"] == 1).sum() * ml, rel=0.1)
    percent = 100.0 * (volume["lesion"] > 0).sum() / (volume["lung"] > 0).sum()
    assert q["total"]["involvement_percent"] == pytest.approx(percent)


def test_png_folder_is_stacked_and_its_assumptions_reported(tmp_path, checkpoints):
    volume = chest_phantom(seed=1, orientation="LPS")
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(volume["image"].shape[2]):
        Image.fromarray(hu_to_png(volume["image"][:, :, z].T, LUNG_WINDOW)).save(folder / f"NCP_5_1_{z:04d}.png")
    out = tmp_path / "out"
    report = _run([str(folder), "--out", str(out), *_flags(checkpoints), "--png_spacing", "1.5", "1.5", "4",
                   "--skip", "covid_cls"])
    scan = nib.load(out / "scan.nii.gz")
    assert scan.shape == volume["image"].shape
    assert nib.load(out / "lungs.nii.gz").shape == scan.shape
    assert report["assumed"] == {"png_window_hu": list(LUNG_WINDOW), "png_spacing_mm": [1.5, 1.5, 4.0]}
    assert "mask_net_classifier" in report["covid"] and "covid_cls" not in report["covid"]


def test_models_come_from_the_manifest(tmp_path, checkpoints):
    models = tmp_path / "models"
    for name in ("lung_seg", "lesion_seg"):
        register(models, name=name, ckpt=checkpoints[name])
    _write_scan(tmp_path / "scan.nii.gz")
    report = _run([str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out"), "--models_dir", str(models),
                   "--skip", "covid_cls", "mask_net_classifier"])
    assert [m["path"] for m in report["models"]] == [str(models / "lung_seg.pth"), str(models / "lesion_seg.pth")]
    assert report["models"][0]["sha256"] == load_manifest(models)["models"][0]["sha256"]


def test_missing_model_names_it_and_how_to_produce_it(tmp_path, checkpoints):
    _write_scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    argv = [str(tmp_path / "scan.nii.gz"), "--out", str(out), "--models_dir", str(tmp_path / "no_models"),
            "--lung_ckpt", str(checkpoints["lung_seg"])]
    with pytest.raises(FileNotFoundError) as err:
        _run(argv)
    message = str(err.value)
    assert "lesion_seg model missing" in message and "--lesion_ckpt" in message and "train_volumetric.py" in message
    assert not out.exists()  # nothing is written before every model is found
    with pytest.raises(FileNotFoundError, match="--lung_ckpt .*nope.pth does not exist"):
        _run([str(tmp_path / "scan.nii.gz"), "--out", str(out), "--lung_ckpt", str(tmp_path / "nope.pth")])


def test_bad_inputs_are_named(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError, match="input not found: .*missing.nii.gz"):
        _run([str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o1"), *_flags(checkpoints)])
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), flat)
    with pytest.raises(ValueError, match="flat.nii.gz"):
        _run([str(flat), "--out", str(tmp_path / "o2"), *_flags(checkpoints)])


def test_non_hu_input_is_refused_unless_allowed_and_then_reported(tmp_path, checkpoints, capsys):
    volume = chest_phantom(seed=2)
    grey = tmp_path / "grey.nii.gz"  # 0-255 intensities, not Hounsfield units
    nib.save(nib.Nifti1Image(hu_to_png(volume["image"]).astype(np.int16), volume["affine"]), grey)
    argv = [str(grey), "--out", str(tmp_path / "o3"), *_flags(checkpoints), "--skip", "covid_cls",
            "mask_net_classifier"]
    with pytest.raises(ValueError, match=r"grey.nii.gz: .*Hounsfield units: values span \[\d+, 255\], an 8-bit "
                                         "image.*--allow_non_hu"):
        _run(argv)
    assert not (tmp_path / "o3" / "report.json").exists()
    report = _run([*argv, "--allow_non_hu"])
    (message,) = report["warnings"]  # the models' loaders repeat it; the report lists it once
    assert message.startswith("NotHUWarning: ") and "grey.nii.gz" in message and "8-bit image" in message
    assert json.loads((tmp_path / "o3" / "report.json").read_text())["warnings"] == [message]
    page = (tmp_path / "o3" / "report.html").read_text()
    assert page.index("Warnings (1)") < page.index("Lungs and lesions") and "grey.nii.gz" in page
    assert "grey.nii.gz" in capsys.readouterr().err.split("warning:")[1]


def test_output_that_is_the_input_is_refused(tmp_path, checkpoints):
    """An input named lungs.nii.gz with --out its own folder was replaced by the lung mask."""
    _write_scan(tmp_path / "lungs.nii.gz")
    before = (tmp_path / "lungs.nii.gz").read_bytes()
    with pytest.raises(ValueError, match=r"output .*lungs.nii.gz is the input .*lungs.nii.gz"):
        _run([str(tmp_path / "lungs.nii.gz"), "--out", str(tmp_path), *_flags(checkpoints)])
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="is the input"):  # the same folder by another name
        _run([str(tmp_path / "lungs.nii.gz"), "--out", str(tmp_path / "link"), *_flags(checkpoints)])
    assert (tmp_path / "lungs.nii.gz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "lungs.nii.gz"]


def test_nan_voxels_are_refused_or_filled_and_reported(tmp_path, monkeypatch, checkpoints):
    """0.6 % NaN voxels gave an empty lung mask, 0 mL and severity 0 with exit 0."""
    volume, affine = _write_scan(tmp_path / "clean.nii.gz", seed=5)
    image = volume["image"].astype(np.float32)
    image.flat[::160] = np.nan
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan_nan.nii.gz")
    argv = [str(tmp_path / "scan_nan.nii.gz"), "--out", str(tmp_path / "out"), "--skip", "covid_cls",
            "mask_net_classifier"]
    bad = int(np.isnan(image).sum())
    with pytest.raises(ValueError, match=rf"scan_nan.nii.gz: {bad} of {image.size} voxels are NaN or infinite"):
        _run([*argv, *_flags(checkpoints)])
    read = {}

    def segment(name, image_path, **_):
        read[name] = nib.load(image_path).get_fdata()
        return (volume["lung" if name == "lung_seg" else "lesion"] > 0).astype(np.uint8), affine

    monkeypatch.setattr(analysis_steps, "segment", segment)
    report = _run([*argv, *_flags(checkpoints), "--fill_nan", "-1000"])
    assert all(np.isfinite(a).all() and (a[np.isnan(image)] == -1000).all() for a in read.values())
    assert report["assumed"] == {"fill_nan_hu": -1000.0}
    assert report["warnings"] == [f"NonFiniteWarning: {tmp_path / 'scan_nan.nii.gz'}: {bad} of {image.size} voxels "
                                  "are NaN or infinite; replaced by -1000 HU"]
    assert report["quantities"]["total"]["lung_ml"] > 0


def test_the_library_loads_models_once_and_analyses_paths_and_arrays(tmp_path, monkeypatch, checkpoints):
    """What a notebook or a cohort runner does: load the models once, then analyse several scans."""
    from models.analysis import analyze, load_models, loading

    volume, affine = _write_scan(tmp_path / "scan.nii.gz", seed=3)
    models = load_models(tmp_path / "none", checkpoints=dict(checkpoints), skip=["covid_cls"])
    monkeypatch.setattr(loading, "_load", lambda *a, **k: pytest.fail("a model was loaded twice"))
    kept = analyze(tmp_path / "scan.nii.gz", models, out_dir=tmp_path / "out", verbose=False)
    in_memory = analyze(volume["image"].astype(np.float32), models, affine=affine, verbose=False)
    assert kept.page == tmp_path / "out" / "report.html" and kept.page.is_file()
    assert in_memory.page is None and in_memory.summary["files"] == {} and in_memory.summary["input"] == "<array>"
    assert in_memory.summary["quantities"] == kept.summary["quantities"]
    assert in_memory.summary["covid"] == kept.summary["covid"]
    np.testing.assert_array_equal(in_memory.lesions, kept.lesions)
    assert kept.lungs.shape == volume["image"].shape and set(np.unique(kept.lungs)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="needs its affine"):
        analyze(volume["image"], models, verbose=False)


def test_models_load_now_or_when_first_needed(tmp_path, checkpoints):
    from models.analysis import CLASSIFIERS, load_models

    (tmp_path / "empty.pth").write_bytes(b"")
    given = {"lung_seg": tmp_path / "empty.pth", "lesion_seg": checkpoints["lesion_seg"]}
    with pytest.raises(ValueError, match="empty.pth: the checkpoint file is empty"):
        load_models(tmp_path / "none", checkpoints=given, skip=CLASSIFIERS)
    lazy = load_models(tmp_path / "none", checkpoints=given, skip=CLASSIFIERS, lazy=True)
    assert list(lazy.paths) == ["lung_seg", "lesion_seg"] and "covid_cls" not in lazy
    with pytest.raises(ValueError, match="unknown models \\['lungs'\\]"):
        load_models(tmp_path / "none", checkpoints={"lungs": checkpoints["lung_seg"]}, lazy=True)


def test_amp_runs_the_segmentation_networks_and_the_2d_classifier_in_bfloat16(tmp_path, monkeypatch, checkpoints):
    """--amp reaches the volumetric segmentation (autocast in its sliding window) and the 2D classifier (wrapped);
    the report's numbers stay float32 and in range."""
    asked, real = [], analysis_steps.segment_case
    monkeypatch.setattr(analysis_steps, "segment_case", lambda *a, **k: asked.append(k["amp"]) or real(*a, **k))
    _write_scan(tmp_path / "scan.nii.gz")
    report = _run([str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out"), *_flags(checkpoints), "--amp"])
    assert asked == [True, True]
    assert all(0.0 <= c["probability"] <= 1.0 for c in report["covid"].values())
    models = analyze_scan.load_models(device="cpu", checkpoints={k: str(v) for k, v in checkpoints.items()}, amp=True)
    assert isinstance(models.get("mask_net_classifier").model, amp.AutocastInference)


def test_lung_mask_outside_the_body_is_not_counted_as_lung():
    from utils.quantify import LUNG_LEFT, LUNG_RIGHT

    x, y = np.mgrid[:60, :50]
    body = ((x - 30) / 22.0) ** 2 + ((y - 25) / 16.0) ** 2 <= 1
    left_lung = ((x - 20) / 6.0) ** 2 + ((y - 25) / 9.0) ** 2 <= 1  # RAS: -x is the patient's left
    right_lung = ((x - 40) / 6.0) ** 2 + ((y - 25) / 9.0) ** 2 <= 1
    image = np.where(body, 40.0, -1000.0)[..., None].repeat(6, axis=2)
    image[(right_lung | left_lung)] = -850.0
    outside = np.zeros((60, 50), bool)
    outside[2:6, 2:10] = True  # air beside the chest, called lung by the network
    lung = np.repeat((right_lung | left_lung | outside)[..., None], 6, axis=2).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    lungs, lesions = analysis_steps.lungs_and_lesions(lung, np.zeros_like(lung), image, affine,
                                                      consolidation_hu=-300.0, body_threshold_hu=-500.0)
    assert not lungs[2:6, 2:10].any() and not lesions.any()
    assert (lungs[right_lung] == LUNG_RIGHT).all() and (lungs[left_lung] == LUNG_LEFT).all()
    assert ((lungs > 0) == np.repeat((right_lung | left_lung)[..., None], 6, axis=2)).all()
    # a body outline the field of view cuts open encloses nothing: the mask is kept as the network gave it
    open_outline = np.full_like(image, -1000.0)
    kept, _ = analysis_steps.lungs_and_lesions(lung, np.zeros_like(lung), open_outline, affine,
                                               consolidation_hu=-300.0, body_threshold_hu=-500.0)
    assert ((kept > 0) == (lung > 0)).all()
