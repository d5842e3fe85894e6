"""Task registry, builders, configs and one training step per volumetric task."""
from __future__ import annotations

import pytest
import torch
import torchvision
from monai.data import DataLoader

from models.volumetric import get_task, task_names
from models.volumetric.config import SegConfig
from models.volumetric.lesion_seg import build_network as build_segresnet
from models.volumetric.lung_seg import build_network as build_ahnet
from models.volumetric.lung_seg import transfer_from_resnet50
from models.volumetric.training import make_datasets, train_one_epoch
from tests.helpers import TINY_CONFIG, write_case


def test_registry_knows_both_tasks_and_refuses_others():
    assert set(task_names()) >= {"lung_seg", "lesion_seg"}
    assert get_task("lung_seg").builder == "models.volumetric.lung_seg.build_network"
    with pytest.raises(ValueError, match="unknown volumetric task 'organ'"):
        get_task("organ")


def test_issue_defaults():
    lung, lesion = get_task("lung_seg").default_config, get_task("lesion_seg").default_config
    assert lung.spacing == lesion.spacing == (0.8, 0.8, 5.0)
    assert lung.roi_size == lesion.roi_size == (224, 224, 32)
    assert lung.hu_window == (-1500.0, 500.0) and lesion.hu_window == (-1000.0, 500.0)
    assert lung.orientation == "RAS" and lung.overlap == 0.25


def test_segresnet_output_shape():
    model = build_segresnet()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 16))
    assert out.shape == (1, 2, 32, 32, 16)


def test_ahnet_output_shape_and_validation():
    model = build_ahnet(psp_block_num=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 32, 32, 32)
    # the default decoder up-samples trilinearly; MONAI's transposed convolutions stay available
    # (checkpoints store the mode), but they left a checkerboard in lungs trained from scratch
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in model.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose3d) for m in build_ahnet(upsample_mode="transpose").modules())
    with pytest.raises(ValueError, match="psp_block_num must be 0..2"):
        build_ahnet(psp_block_num=3)


def test_config_checks_roi_against_network_and_round_trips():
    with pytest.raises(ValueError, match="multiple of 32"):
        get_task("lung_seg").make_config(roi_size=(48, 48, 32))
    with pytest.raises(ValueError, match="hu_window"):
        SegConfig(spacing=(1, 1, 1), roi_size=(8, 8, 8), hu_window=(500, -1000))
    config = get_task("lesion_seg").make_config(roi_size=(32, 32, 16), overlap=(0.25, 0.25, 0.0))
    assert SegConfig.from_dict(config.to_dict()) == config


def test_resnet50_transfer_copies_2d_weights_into_ahnet(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    model = transfer_from_resnet50(build_ahnet(), tmp_path / "resnet50.pth")
    # conv1 7x7 over 3 RGB channels becomes 7x7x3 over the slice axis.
    expected = resnet.conv1.weight.unsqueeze(4).permute(0, 4, 2, 3, 1)
    assert torch.equal(model.conv1.weight, expected)
    conv2d = resnet.layer1[0].conv1.weight
    assert torch.equal(model.layer1[0].conv1.weight[..., 0], conv2d)
    with pytest.raises(ValueError, match="not a torchvision ResNet50"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
        transfer_from_resnet50(build_ahnet(), tmp_path / "other.pth")


@pytest.mark.parametrize("name,label", [("lesion_seg", "lesion"), ("lung_seg", "lung")])
def test_one_training_step_per_task(tmp_path, name, label):
    task = get_task(name)
    config = task.make_config(**TINY_CONFIG[name])
    case = write_case(tmp_path, "c0", seed=0, label=label)
    train_set, _ = make_datasets(task, config, train_cases=[case], val_cases=[case], cache_rate=1.0)
    batch = next(iter(DataLoader(train_set, batch_size=1)))
    assert batch["image"].shape == (1, 1, *config.roi_size)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}
    model, _ = task.build_network()
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(train_set, batch_size=1)
    loss = train_one_epoch(model, loader, optimizer=torch.optim.Adam(model.parameters(), lr=task.default_lr),
                           loss_fn=task.loss(), device=torch.device("cpu"), scaler=None, amp=False, progress=False)
    assert 0.0 < loss < 10.0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def _logits(foreground: torch.Tensor, confidence: float = 6.0) -> torch.Tensor:
    """Two-class logits Float[B, 2, ...] predicting ``foreground`` Bool[B, 1, ...] with the given margin."""
    fg = foreground.float() * 2 - 1
    return torch.cat([-confidence * fg, confidence * fg], dim=1)


def test_lesion_loss_does_not_reward_predicting_no_lesion():
    """A batch of one lesion crop and one empty crop: the right answer scores near 0 and finding nothing
    does not. (The per-crop Dice with background gave the empty crop a lesion Dice near 0 for any soft
    prediction, so even the right answer lost 0.25.)"""
    label = torch.zeros((2, 1, 8, 8, 4))
    label[0, :, 2:5, 2:5, 1:3] = 1
    loss = get_task("lesion_seg").loss()
    found, nothing = loss(_logits(label > 0), label), loss(_logits(torch.zeros_like(label, dtype=torch.bool)), label)
    assert found < 0.05 < nothing
    dice = loss.dice  # the Dice part on its own: lesion class only, pooled over the batch
    assert float(dice(_logits(label > 0), label)) < 0.01
    assert float(dice(_logits(torch.zeros_like(label, dtype=torch.bool)), label)) > 0.99


def test_lung_postprocessing_keeps_the_two_largest_components():
    labels = torch.zeros((1, 20, 20, 6), dtype=torch.uint8)
    labels[0, 1:8, 1:8, 1:5] = 1  # left lung
    labels[0, 11:19, 1:9, 1:5] = 1  # right lung
    labels[0, 15:17, 15:17, 2:3] = 1  # small false positive
    kept = get_task("lung_seg").postprocessing(get_task("lung_seg").default_config)(labels)
    assert int(torch.as_tensor(kept).sum()) == 7 * 7 * 4 + 8 * 8 * 4


def test_crop_boxes_cover_the_lungs_and_the_lung_box_is_tighter():
    from models.volumetric.sliding_window import crop_box
    from tests.helpers import chest_phantom

    volume = chest_phantom(seed=3, shape=(64, 64, 12))
    config = get_task("lesion_seg").make_config(crop_margin=0)
    image = torch.as_tensor((volume["image"].astype("float32") + 1000.0) / 1500.0).clamp(0, 1)[None]
    lung_box = crop_box(image, config=config)
    body_box = crop_box(image, config=config.replace(crop_region="body"))
    lungs = torch.as_tensor(volume["lung"] > 0)
    inside = torch.zeros_like(lungs)
    inside[lung_box] = True
    assert bool(inside[lungs].all())
    assert inside.sum() < torch.zeros_like(lungs)[body_box].numel() or body_box == lung_box
    assert crop_box(image, config=config.replace(crop_region="none")) is None


@pytest.mark.parametrize("box, shape, roi, want", [
    ((slice(10, 20), slice(0, 64), slice(2, 6)), (64, 64, 12), (32, 32, 16), ((0, 32), (0, 64), (0, 12))),
    ((slice(30, 40), slice(50, 60), slice(0, 12)), (64, 64, 40), (16, 32, 8), ((27, 43), (32, 64), (0, 12))),
    ((slice(5, 9), slice(20, 50), slice(4, 5)), (70, 64, 30), (20, 16, 6), ((0, 20), (20, 50), (2, 8))),
])
def test_window_region_grows_short_sides_to_the_roi_inside_the_volume(box, shape, roi, want):
    from models.volumetric.sliding_window import window_region

    region = window_region(box, shape, roi)
    assert tuple((s.start, s.stop) for s in region) == want
    for s, b, n, w in zip(region, box, shape, roi):
        assert s.start <= b.start and s.stop >= b.stop and 0 <= s.start and s.stop <= n  # covers the box, inside
        assert s.stop - s.start == max(b.stop - b.start, min(w, n))
    assert window_region(None, shape, roi) == tuple(slice(0, n) for n in shape)


def test_segment_windows_hold_the_image_around_a_small_box():
    """A box narrower than the ROI is segmented with the image around it, not zero padding."""
    from models.volumetric.sliding_window import segment

    seen = []

    class Recorder(torch.nn.Module):  # records what each window holds; predicts background
        def forward(self, windows):
            seen.append(windows.clone())
            return torch.zeros((windows.shape[0], 2, *windows.shape[2:]))

    image = torch.full((1, 40, 40, 8), 0.9)
    image[0, 16:24, 16:24, 2:6] = 0.1  # a dark "lung" enclosed by bright "body"
    config = get_task("lesion_seg").make_config(roi_size=(32, 32, 8), crop_margin=0, spacing=(1.0, 1.0, 1.0))
    segment(Recorder(), image, config=config, device=torch.device("cpu"))
    (windows,) = seen
    assert windows.shape == (1, 1, 32, 32, 8)
    torch.testing.assert_close(windows[0, 0], image[0, 4:36, 4:36, :])


@pytest.mark.parametrize("blend_mode", ["constant", "gaussian"])
def test_segment_over_the_whole_volume_is_monais_sliding_window_inference(blend_mode):
    """With ``crop_region="none"`` our path is MONAI's ``sliding_window_inference`` with the same blending."""
    from monai.inferers import sliding_window_inference

    from models.volumetric.sliding_window import prepare_for_inference, segment

    torch.manual_seed(0)
    model = build_segresnet().eval()
    image = torch.rand(1, 40, 36, 12)
    config = get_task("lesion_seg").make_config(roi_size=(16, 16, 8), crop_region="none", blend_mode=blend_mode)
    with torch.no_grad():
        logits = sliding_window_inference(image[None], (16, 16, 8), 4, model, overlap=0.25, mode=blend_mode)
    want = logits[0].argmax(dim=0, keepdim=True).to(torch.uint8)
    got = segment(prepare_for_inference(model, device=torch.device("cpu")), image, config=config,
                  device=torch.device("cpu"))
    assert (got != want).float().mean() < 1e-3  # channels-last rounding may flip a tie-level voxel
    assert 0 < int(got.sum()) < got.numel()


def test_blend_mode_is_checked():
    with pytest.raises(ValueError, match="blend_mode must be one of"):
        get_task("lesion_seg").make_config(blend_mode="mean")


def test_tasks_load_without_the_registry_users():
    """No cycle: the task modules never import the modules that look tasks up (inference, trainer, bundle writer)."""
    import subprocess
    import sys

    code = ("import sys; from models.volumetric import get_task, task_names; [get_task(n) for n in task_names()]; "
            "print(sorted(m for m in sys.modules if m in ('models.volumetric.inference', 'models.volumetric.trainer', "
            "'models.volumetric.bundle.writer', 'models.volumetric.validation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
