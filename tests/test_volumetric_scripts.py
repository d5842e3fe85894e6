"""End to end on tiny phantoms: train -> validate -> infer, and masks on the input's own grid."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric
from monai.transforms import Compose, Invertd

import infer_volumetric
import train_volumetric
import validate_volumetric
from models.volumetric import get_task
from models.volumetric.segmentation import segment_case
from models.volumetric.sliding_window import segment
from tests.helpers import TINY_CONFIG, chest_phantom, write_case, write_datalist, write_dicom_series
from utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint

LESION_FLAGS = ["--roi_size", "32", "32", "16", "--spacing", "2", "2", "4"]
# Halfway between air (-1000 HU) and the test objects (100 HU) in lesion_seg's window [-1000, 500]:
# a threshold there puts the boundary of a blurred (resampled) object where the object's edge is.
HALF_MAXIMUM = (100 + 1000) / 1500 / 2


class ThresholdNet(torch.nn.Module):
    """Logits [t - x, x - t]: foreground where the scaled intensity exceeds ``t``."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.t - x, x - self.t], dim=1)


def _lps_cube_volume(tmp_path):
    """LPS, anisotropic, oblique-free volume with a bright cube off-centre (so flips would show)."""
    shape = (50, 40, 13)
    image = np.full(shape, -1000, np.int16)
    image[5:20, 22:36, 2:7] = 100
    affine = np.diag([-0.7, -1.1, 3.3, 1.0])
    affine[:3, 3] = [12.5, -40.0, 7.0]
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    return path, image, nib.load(path).affine


@pytest.mark.parametrize("crop_region", ["body", "none"])
def test_mask_has_the_input_grid_and_lands_where_the_structure_is(tmp_path, crop_region):
    path, image, affine = _lps_cube_volume(tmp_path)
    task = get_task("lesion_seg")
    config = task.make_config(**TINY_CONFIG["lesion_seg"], crop_region=crop_region)
    out = segment_case({"image": str(path)}, model=ThresholdNet(HALF_MAXIMUM), task=task, config=config,
                       device=torch.device("cpu"))
    assert out["mask"].shape == image.shape
    np.testing.assert_allclose(out["affine"], affine, atol=1e-6)
    truth = torch.as_tensor(image > -250)[None, None].float()
    dice = DiceMetric()(torch.as_tensor(out["mask"])[None, None].float(), truth).item()
    assert dice > 0.9


def test_mask_boundary_follows_the_probabilities_not_the_working_grid_blocks(tmp_path):
    """A ball at 0.7 x 0.7 x 1 mm segmented on a 2 x 2 x 4 mm grid: the class probabilities mapped
    back with the image's interpolation give a closer mask than the label map mapped back by nearest
    neighbour (the pre-processing, network and Invertd are the same; only the inversion differs)."""
    shape, spacing = (64, 64, 40), (0.7, 0.7, 1.0)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - n / 2 + 0.3) * s for n, s in zip(shape, spacing)],
                                indexing="ij"))
    ball = (grid ** 2).sum(0) < 15.0 ** 2
    path = tmp_path / "ball.nii.gz"
    nib.save(nib.Nifti1Image(np.where(ball, 100, -1000).astype(np.int16), np.diag([*spacing, 1.0])), path)
    task = get_task("lesion_seg")
    config = task.make_config(**TINY_CONFIG["lesion_seg"], crop_region="none")
    net, cpu = ThresholdNet(HALF_MAXIMUM), torch.device("cpu")
    out = segment_case({"image": str(path)}, model=net, task=task, config=config, device=cpu)
    transforms = task.preprocessing(config, keys=("image",))
    data = Compose(transforms)({"image": str(path)})
    data["pred"] = MetaTensor(segment(net, data["image"], config=config, device=cpu))
    blocks = Invertd("pred", transform=Compose(transforms[1:]), orig_keys="image", nearest_interp=True)(data)["pred"]

    def dice(mask):
        mask = np.asarray(mask).astype(bool)
        return 2 * (mask & ball).sum() / (mask.sum() + ball.sum())

    assert out["mask"].shape == shape and blocks.shape[1:] == shape
    assert dice(out["mask"]) > 0.96 and dice(out["mask"]) > dice(blocks[0]) + 0.02  # 0.966 against 0.932


def test_train_validate_infer_end_to_end(tmp_path):
    datalist = write_datalist(tmp_path / "data", label="lesion", n_train=2, n_val=1)
    run = tmp_path / "run"
    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        ["--task", "lesion_seg", "--datalist", str(datalist), "--epochs", "2", "--batch_size", "2",
         "--save_dir", str(run), "--val_every", "1", "--lr", "1e-3", "--lr_schedule", "cosine", *LESION_FLAGS]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all("val_dice" in r for r in records)
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 5e-4])  # cosine over the two epochs
    ckpt = load_checkpoint(run / "checkpoint_best.pth")
    assert ckpt["task"] == "lesion_seg" and ckpt["builder"] == "models.volumetric.lesion_seg.build_network"
    assert ckpt["task_config"]["roi_size"] == [32, 32, 16]
    assert ckpt["best"]["value"] == max(r["val_dice"] for r in records)
    _check_validate(run, datalist, tmp_path / "val")
    _check_infer(run, tmp_path)


def test_warmup_epochs_ramp_the_learning_rate(tmp_path):
    datalist = write_datalist(tmp_path / "data", label="lesion", n_train=2, n_val=1)
    run = tmp_path / "run"
    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        ["--task", "lesion_seg", "--datalist", str(datalist), "--epochs", "3", "--warmup_epochs", "2",
         "--save_dir", str(run), "--val_every", "3", "--lr", "1e-3", *LESION_FLAGS]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([1e-6, 1e-3 * (0.001 + 0.999 / 2), 1e-3])
    assert load_checkpoint(run / "checkpoint_last.pth")["args"]["warmup_epochs"] == 2


def _check_validate(run, datalist, out):
    summary = validate_volumetric.main(validate_volumetric.get_args_parser().parse_args(
        ["--task", "lesion_seg", "--ckpt", str(run / "checkpoint_best.pth"), "--datalist", str(datalist),
         "--output", str(out), "--save_masks"]))
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and summary["cases"] == 1
    mask, label = nib.load(rows[0]["prediction"]).get_fdata(), nib.load(rows[0]["label"]).get_fdata() > 0
    expected = DiceMetric(ignore_empty=False)(torch.as_tensor(mask)[None, None],
                                              torch.as_tensor(label)[None, None].float())
    assert float(rows[0]["dice"]) == pytest.approx(expected.item(), abs=1e-6)
    with (out / "metrics.csv").open() as handle:
        metrics = dict(csv.reader(handle))
    assert float(metrics["mean_dice"]) == pytest.approx(float(rows[0]["dice"]))


def _check_infer(run, tmp_path):
    case = write_case(tmp_path / "lps", "lps_case", seed=5, label="lesion", orientation="LPS", spacing=(0.9, 1.3, 3.5))
    out = tmp_path / "infer"
    rows = infer_volumetric.main(infer_volumetric.get_args_parser().parse_args(
        ["--task", "lesion_seg", "--ckpt", str(run / "checkpoint_last.pth"), "--input", case["image"],
         "--output", str(out)]))
    source, mask = nib.load(case["image"]), nib.load(out / "lps_case_lesion_seg.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-6)
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S")
    assert (out / "lps_case_lesion_seg.png").stat().st_size > 0 and rows[0]["case"] == "lps_case"


def test_the_2d_flag_names_are_aliases_of_the_3d_ones():
    train = train_volumetric.get_args_parser().parse_args(
        ["--task", "lesion_seg", "--datalist", "d.json", "--lrate", "0.5", "--num_epochs", "7", "--num_workers", "3",
         "--out", "run"])
    assert (train.lr, train.epochs, train.workers, train.save_dir) == (0.5, 7, 3, "run")
    common = ["--task", "lesion_seg", "--ckpt", "c.pth"]
    for flag in ("--output", "--save_dir", "--out"):
        infer = infer_volumetric.get_args_parser().parse_args([*common, "--input", "x.nii.gz", flag, "o"])
        validate = validate_volumetric.get_args_parser().parse_args([*common, "--datalist", "d.json", flag, "o"])
        assert infer.output == validate.output == "o"


def test_roi_size_help_shows_each_tasks_default():
    text = " ".join(train_volumetric.get_args_parser().format_help().split())
    assert "lung_seg 224 224 32" in text and "covid_cls 192 192 64" in text


def test_resume_continues_after_the_stored_epoch(tmp_path):
    datalist = write_datalist(tmp_path / "data", label="lesion", n_train=1, n_val=1)
    common = ["--task", "lesion_seg", "--datalist", str(datalist), "--batch_size", "1", *LESION_FLAGS]
    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        [*common, "--epochs", "1", "--save_dir", str(tmp_path / "a")]))
    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        [*common, "--epochs", "2", "--save_dir", str(tmp_path / "b"),
         "--resume", str(tmp_path / "a" / "checkpoint_last.pth")]))
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    with pytest.raises(ValueError, match="checkpoint is for task 'lesion_seg', not 'lung_seg'"):
        validate_volumetric.main(validate_volumetric.get_args_parser().parse_args(
            ["--task", "lung_seg", "--ckpt", str(tmp_path / "b" / "checkpoint_last.pth"), "--datalist", str(datalist)]))


def test_infer_on_a_dicom_folder_writes_masks_on_the_series_grid(tmp_path):
    from datasets.io import read_volume

    hu = chest_phantom(seed=2, shape=(48, 40, 10))["image"]
    folder = write_dicom_series(tmp_path / "series", hu)
    task = get_task("lesion_seg")
    model, kwargs = task.build_network()
    ckpt = make_checkpoint(model=model, builder=task.builder, builder_kwargs=kwargs, epoch=0, task=task.name,
                           task_config=task.make_config(**TINY_CONFIG["lesion_seg"]).to_dict())
    save_checkpoint(ckpt, tmp_path / "ckpt.pth")
    infer_volumetric.main(infer_volumetric.get_args_parser().parse_args(
        ["--task", "lesion_seg", "--ckpt", str(tmp_path / "ckpt.pth"), "--input", str(folder),
         "--output", str(tmp_path / "out"), "--no_montage"]))
    volume, mask = read_volume(folder), nib.load(tmp_path / "out" / "series_lesion_seg.nii.gz")
    np.testing.assert_array_equal(volume.array, hu)  # the series holds the phantom in HU
    assert mask.shape == volume.array.shape
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-5)
