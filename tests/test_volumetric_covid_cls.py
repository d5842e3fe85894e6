"""covid_cls: lung-region crop, DenseNet121-3D classifier, metrics and GradCAM saliency on the input grid."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from monai.visualize import GradCAM

from models.volumetric import covid_cls
from models.volumetric.common import unwrap_transform_error
from models.volumetric.covid_cls import ClsConfig, classification_metrics, classify_case, lung_region_transforms
from models.volumetric.saliency import TARGET_LAYER, SaliencyExplainer, save_saliency_outputs
from tests.helpers import TINY_NET, lps_affine
from tests.helpers import cls_datalist as _phantom_datalist
from tests.helpers import write_cls_case as write_case

HU_WINDOW = (-1000.0, 500.0)








def preprocess(case, config):
    """The task's pre-processing with MONAI's "applying transform" wrapper removed from errors."""
    try:
        return Compose(covid_cls.preprocessing(config))(case)
    except RuntimeError as err:
        raise unwrap_transform_error(err) from err


def load_and_crop(case, config):
    return Compose([covid_cls.LoadLungCased(), *lung_region_transforms(config)])(case)


@pytest.mark.parametrize("mask_intensity", [False, True])
def test_lung_crop_keeps_the_box_plus_margin_and_masks_on_request(tmp_path, mask_intensity):
    case, image, lung = write_case(tmp_path, "c0")
    config = ClsConfig(roi_size=(32, 32, 32), crop_margin=(3, 2, 1), mask_intensity=mask_intensity,
                       mask_erosion_mm=0.0)
    out = load_and_crop(case, config)
    hits = np.nonzero(lung)
    lo = [max(int(h.min()) - m, 0) for h, m in zip(hits, config.crop_margin)]
    hi = [min(int(h.max()) + 1 + m, s) for h, m, s in zip(hits, config.crop_margin, lung.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    assert tuple(out["image"].shape[1:]) == tuple(b - a for a, b in zip(lo, hi))
    windowed = np.clip((image[box].astype(np.float32) - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0, 1)
    inside = lung[box] > 0
    crop = out["image"][0].numpy()
    np.testing.assert_allclose(crop[inside], windowed[inside], atol=1e-5)
    if mask_intensity:
        assert np.all(crop[~inside] == 0)
    else:
        np.testing.assert_allclose(crop[~inside], windowed[~inside], atol=1e-5)
        assert (crop[~inside] > 0.5).any()  # soft tissue around the lungs is kept


def test_mask_erosion_takes_the_same_millimetres_off_every_axis_and_never_empties_the_mask():
    from monai.data import MetaTensor

    from models.volumetric.covid_cls.transforms import ErodeMaskd

    mask = np.zeros((20, 20, 8), np.float32)
    mask[4:16, 5:15, 2:6] = 1
    affine = np.diag([0.7, 0.7, 3.0, 1.0])  # voxel centres 0.7 mm apart in-plane, 3 mm between slices
    out = ErodeMaskd("m", 1.5)({"m": MetaTensor(mask[None], affine=torch.as_tensor(affine))})["m"]
    # a voxel k voxels in from the edge is k * spacing from the nearest outside centre: in-plane the
    # first two (0.7, 1.4 mm) go, along z none does (3 mm)
    expected = np.zeros_like(mask)
    expected[6:14, 7:13, 2:6] = 1
    np.testing.assert_array_equal(out[0].numpy(), expected)
    small = np.zeros((20, 20, 8), np.float32)
    small[9:11, 9:11, 3] = 1
    kept = ErodeMaskd("m", 1.5)({"m": MetaTensor(small[None], affine=torch.as_tensor(affine))})["m"]
    np.testing.assert_array_equal(kept[0].numpy(), small)


@pytest.mark.parametrize("touch_edge", [False, True])
def test_erosion_on_the_masks_box_equals_the_whole_volumes_distance_transform(touch_edge):
    from scipy import ndimage

    from models.volumetric.covid_cls.transforms import far_from_outside

    rng = np.random.default_rng(3)
    inside = ndimage.binary_dilation(rng.random((40, 36, 12)) > 0.985, iterations=3)
    inside[:, :, :2] = inside[:, :, -2:] = False
    inside[:3] = touch_edge  # a mask that runs into the volume's edge, where nothing lies beyond
    spacing = (0.7, 0.8, 2.5)
    for distance in (0.5, 1.5, 3.0):
        expected = ndimage.distance_transform_edt(inside, sampling=spacing) > distance
        np.testing.assert_array_equal(far_from_outside(inside, spacing=spacing, distance_mm=distance), expected)
    assert not far_from_outside(np.zeros((5, 5, 5), bool), spacing=spacing, distance_mm=1.0).any()


def test_checkpoint_configs_from_before_the_erosion_keep_the_mask_whole():
    stored = ClsConfig().to_dict()
    del stored["mask_erosion_mm"]
    assert ClsConfig.from_dict(stored).mask_erosion_mm == 0.0
    assert ClsConfig.from_dict(ClsConfig().to_dict()).mask_erosion_mm == ClsConfig().mask_erosion_mm == 1.5
    with pytest.raises(ValueError, match="mask_erosion_mm must be >= 0"):
        ClsConfig(mask_erosion_mm=-1.0)


@pytest.mark.parametrize("flags, want", [([], None), (["--mask_intensity"], True), (["--no_mask_intensity"], False)])
def test_masking_flags_override_the_config_only_when_given(flags, want):
    import train_volumetric
    from models.volumetric.cli import config_overrides

    args = train_volumetric.get_args_parser().parse_args(["--task", "covid_cls", "--datalist", "d.json",
                                                          "--save_dir", "run", *flags])
    overrides = config_overrides(args)
    assert overrides.get("mask_intensity") is want
    assert covid_cls.TASK.make_config(**overrides).mask_intensity is (True if want is None else want)
    assert "mask_erosion_mm" not in overrides
    erosion = config_overrides(train_volumetric.get_args_parser().parse_args(
        ["--task", "covid_cls", "--datalist", "d.json", "--mask_erosion_mm", "0", *flags]))
    assert covid_cls.TASK.make_config(**erosion).mask_erosion_mm == 0.0


def test_preprocessing_resizes_to_the_network_input(tmp_path):
    case, _, _ = write_case(tmp_path, "c0", affine=lps_affine())
    out = preprocess(case, ClsConfig(roi_size=(32, 32, 32)))
    assert tuple(out["image"].shape) == (1, 32, 32, 32)
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    assert out["label"] == 1.0


def test_bad_cases_are_refused_by_name(tmp_path):
    config = ClsConfig(roi_size=(32, 32, 32))
    empty, _, _ = write_case(tmp_path, "empty_lung", lung=np.zeros((48, 40, 20), np.uint8))
    with pytest.raises(ValueError, match="empty_lung.*empty"):
        preprocess(empty, config)
    other, _, _ = write_case(tmp_path, "other_grid", lung=np.ones((48, 40, 18), np.uint8))
    with pytest.raises(ValueError, match="other_grid.*same grid"):
        preprocess(other, config)
    wrong, _, _ = write_case(tmp_path, "three", label=3)
    with pytest.raises(ValueError, match="three.*label must be 0 or 1"):
        preprocess(wrong, config)
    with pytest.raises(ValueError, match="roi_size"):
        ClsConfig(roi_size=(32, 32, 16))


def test_classifier_output_shape_and_one_training_step(tmp_path):
    torch.manual_seed(0)
    cases = [write_case(tmp_path, f"c{i}", label=i % 2, seed=i)[0] for i in range(2)]
    config = ClsConfig(roi_size=(32, 32, 32))
    transform = Compose(covid_cls.preprocessing(config) + covid_cls.augmentation(config))
    batch = next(iter(DataLoader(Dataset(cases, transform), batch_size=2)))
    model = covid_cls.build_network(**TINY_NET)
    optimizer = torch.optim.Adam(model.parameters(), lr=covid_cls.TASK.default_lr)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(batch["image"].as_tensor())
    assert logits.shape == (2, 1)
    loss = covid_cls.loss()(logits, batch["label"])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.0], [1.0]]))
    assert torch.isfinite(loss) and torch.allclose(loss, expected)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_builder_validates_its_arguments():
    with pytest.raises(ValueError, match="growth_rate"):
        covid_cls.build_network(growth_rate=0)
    with pytest.raises(ValueError, match="dropout_prob"):
        covid_cls.build_network(dropout_prob=1.0)


def test_metrics_against_hand_counts_and_pairwise_auc():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    probs = [0.9, 0.6, 0.4, 0.1, 0.55, 0.3, 0.2, 0.7]
    m = classification_metrics(labels, probs, threshold=0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(3 / 4)
    pos = [p for p, y in zip(probs, labels) if y]
    neg = [p for p, y in zip(probs, labels) if not y]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg]
    assert m["auc"] == pytest.approx(sum(pairs) / len(pairs))
    # log loss: torch's binary cross-entropy of the same probabilities
    expected = torch.nn.functional.binary_cross_entropy(torch.tensor(probs, dtype=torch.float64),
                                                        torch.tensor(labels, dtype=torch.float64))
    assert m["log_loss"] == pytest.approx(float(expected))
    assert classification_metrics([1, 0], [1.0, 0.0])["log_loss"] == pytest.approx(1e-7, rel=1e-3)  # clipped
    with pytest.warns(UserWarning, match="one class"):
        assert np.isnan(classification_metrics([1, 1], [0.2, 0.9])["auc"])


def _model_with_head_sign(sign: float) -> torch.nn.Module:
    """Tiny DenseNet whose head weights all have one sign and no bias: the logit's sign is ``sign``."""
    torch.manual_seed(0)
    model = covid_cls.build_network(**TINY_NET).eval()
    with torch.no_grad():
        head = model.class_layers.out
        head.weight.copy_(sign * head.weight.abs())
        head.bias.zero_()
    return model


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_saliency_is_nonzero_for_positive_and_negative_predictions(method):
    image = torch.rand(1, 1, 64, 32, 32)  # the target layer's grid is 2 x 1 x 1
    positive, negative = _model_with_head_sign(1.0), _model_with_head_sign(-1.0)
    with torch.no_grad():
        assert float(positive(image)) > 0 > float(negative(image))
    # The target layer's activations are >= 0 (after ReLU); with all head weights <= 0 the plain
    # single-logit GradCAM map of the negative prediction is exactly zero.
    plain = GradCAM(nn_module=_model_with_head_sign(-1.0), target_layers=TARGET_LAYER, postprocessing=lambda m: m)
    assert float(plain(image).abs().max()) == 0.0
    pos_map, pos_cls = SaliencyExplainer(positive, method=method)(image)
    neg_map, neg_cls = SaliencyExplainer(negative, method=method)(image)
    assert pos_cls.tolist() == [1] and neg_cls.tolist() == [0]
    for saliency in (pos_map, neg_map):
        assert saliency.shape == image.shape
        assert float(saliency.max()) == pytest.approx(1.0) and float(saliency.min()) >= 0.0
        assert float(saliency.std()) > 0  # a map, not a constant
    # The negative model is the positive one with the logit negated: same evidence, same map.
    torch.testing.assert_close(neg_map, pos_map, atol=1e-5, rtol=1e-4)


def test_explainer_rejects_unknown_layer_and_method():
    model = covid_cls.build_network(**TINY_NET)
    with pytest.raises(ValueError, match="not found"):
        SaliencyExplainer(model, target_layer="class_layers.nope")
    with pytest.raises(ValueError, match="method"):
        SaliencyExplainer(model, method="lime")


def test_saliency_files_are_on_the_input_grid(tmp_path):
    affine = lps_affine()
    case, image, _ = write_case(tmp_path, "lps", affine=affine, shape=(70, 60, 20))
    config = ClsConfig(roi_size=(64, 32, 32))
    model = _model_with_head_sign(-1.0)
    out = classify_case(case, model=model, config=config, device=torch.device("cpu"), saliency="gradcam")
    assert out["prediction"] == 0 and out["probability"] < 0.5 and out["label"] == 1
    files = save_saliency_outputs(out, tmp_path / "infer")
    written = nib.load(files["saliency"])
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    saliency = np.asarray(written.dataobj)
    assert saliency.max() > 0 and saliency.min() >= 0 and saliency.max() <= 1
    lung = nib.load(case["label_image"]).get_fdata() > 0
    assert saliency[lung].max() > 0  # the map lies over the lung region the network saw
    assert (tmp_path / "infer" / "lps_saliency.png").stat().st_size > 0




def test_train_validate_infer_end_to_end(tmp_path, monkeypatch):
    import csv
    import json

    import infer_volumetric
    import train_volumetric
    import validate_volumetric
    from utils.checkpoint import load_checkpoint

    for key, value in TINY_NET.items():
        monkeypatch.setitem(covid_cls.TASK.network_kwargs, key, value)
    datalist, run = _phantom_datalist(tmp_path / "data"), tmp_path / "run"
    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        ["--task", "covid_cls", "--datalist", str(datalist), "--epochs", "1", "--batch_size", "2",
         "--roi_size", "32", "32", "32", "--save_dir", str(run)]))
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_loss", "val_auc", "val_accuracy", "val_sensitivity", "val_specificity"} <= set(record)
    ckpt = load_checkpoint(run / "checkpoint_best.pth")
    # masking is the default
    assert ckpt["task_config"]["mask_intensity"] is True and ckpt["task_config"]["roi_size"] == [32, 32, 32]

    summary = validate_volumetric.main(validate_volumetric.get_args_parser().parse_args(
        ["--task", "covid_cls", "--ckpt", str(run / "checkpoint_best.pth"), "--datalist", str(datalist),
         "--output", str(tmp_path / "val")]))
    rows = list(csv.DictReader((tmp_path / "val" / "predictions.csv").open()))
    assert [int(r["label"]) for r in rows] == [1, 0]
    positive, negative = (float(r["probability"]) for r in rows)
    assert summary["auc"] == (1.0 if positive > negative else 0.5 if positive == negative else 0.0)
    metrics = dict(csv.reader((tmp_path / "val" / "metrics.csv").open()))
    assert float(metrics["accuracy"]) == pytest.approx(((positive >= 0.5) + (negative < 0.5)) / 2)

    out = tmp_path / "infer"
    rows = infer_volumetric.main(infer_volumetric.get_args_parser().parse_args(
        ["--task", "covid_cls", "--ckpt", str(run / "checkpoint_best.pth"), "--input", str(datalist),
         "--section", "validation", "--saliency", "gradcampp", "--output", str(out)]))
    assert len(rows) == 2 and (out / "predictions.csv").is_file()
    for row in rows:
        source = nib.load(tmp_path / "data" / f"{row['case']}.nii.gz")
        saliency = nib.load(row["saliency"])
        assert saliency.shape == source.shape
        np.testing.assert_allclose(saliency.affine, source.affine, atol=1e-5)
        assert np.asarray(saliency.dataobj).max() > 0 and Path(row["overlay"]).is_file()


def test_infer_segments_the_lungs_when_no_mask_is_given(tmp_path):
    from models.volumetric import get_task

    class DarkIsLung(torch.nn.Module):
        """Logits [x - t, t - x]: "lung" where the windowed intensity is below t."""

        def forward(self, x):
            return torch.cat([x - 0.4, 0.4 - x], dim=1)

    case, image, _ = write_case(tmp_path, "scan", affine=lps_affine())
    lung_task = get_task("lung_seg")
    lung = (DarkIsLung(), lung_task, lung_task.make_config(spacing=(2.0, 2.0, 4.0), roi_size=(32, 32, 32)))
    model, config = _model_with_head_sign(1.0), ClsConfig(roi_size=(32, 32, 32))
    scan_only = {"image": case["image"], "case": "scan"}
    with pytest.raises(ValueError, match="scan.*no lung mask.*--lung_ckpt"):
        covid_cls.infer_cases([scan_only], model=model, config=config, device=torch.device("cpu"), output=tmp_path)
    rows = covid_cls.infer_cases([scan_only], model=model, config=config, device=torch.device("cpu"),
                                 output=tmp_path / "out", lung_model=lung, progress=False)
    mask = nib.load(rows[0]["lung_mask"])
    assert mask.shape == image.shape and np.asarray(mask.dataobj).any()
    assert rows[0]["prediction"] == 1 and rows[0]["saliency"] == ""
