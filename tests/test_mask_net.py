"""Contracts of the Mask R-CNN stack in models/mask_net on tiny images."""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.fast import FastPathFallbackWarning, fast_inference_copy, kernels
from models.mask_net.fast.fusion import (
    InferenceBasicBlock,
    InferenceBottleneck,
    InferenceFPN,
    InferenceRPNHead,
    WinogradConv2d,
)
from models.mask_net.fast.poolers import GatherMultiScaleRoIAlign, use_gather_poolers
from models.mask_net.fast.roi_heads import ChannelsLastTwoMLPHead, InferenceRoIHeads
from models.mask_net.mask_head import MaskPredictor
from models.mask_net.paste import paste_masks
from tests.helpers import randomise_batchnorm

LOSS_KEYS = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
SMALL = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
             rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
             box_detections_per_img=20)
CONFIGS = [("resnet18", 0), ("resnet18", 1), ("resnet18", 2), ("resnet34", 0), ("resnet34", 1), ("resnet34", 2),
           ("resnet50", 0)]



def small_model(backbone_name="resnet18", truncation=1, num_classes=3, **kw):
    return maskrcnn_resnet_fpn(backbone_name=backbone_name, truncation=truncation, num_classes=num_classes,
                               **{**SMALL, **kw})


def lesion_target(height: int, width: int, num: int, label: int = 1) -> dict:
    """``num`` rectangular lesions with their boxes, labels and uint8 masks."""
    masks = torch.zeros((num, height, width), dtype=torch.uint8)
    boxes = []
    for i in range(num):
        x0, y0 = 6 + 14 * i, 8 + 9 * i
        masks[i, y0:y0 + 12, x0:x0 + 16] = 1
        boxes.append([x0, y0, x0 + 16, y0 + 12])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.full((num,), label, dtype=torch.int64), "masks": masks}


def check_detections(out: dict, height: int, width: int, num_classes: int) -> None:
    n = out["boxes"].shape[0]
    assert set(out) == {"boxes", "scores", "labels", "masks"}
    assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].dtype == torch.int64
    assert out["masks"].shape == (n, 1, height, width) and out["masks"].dtype == torch.float32
    if n:
        assert out["masks"].min() >= 0 and out["masks"].max() <= 1
        assert out["labels"].min() >= 1 and out["labels"].max() < num_classes
        assert (out["boxes"][:, 2] <= width).all() and (out["boxes"][:, 3] <= height).all()


@pytest.mark.parametrize("backbone_name,truncation", CONFIGS)
def test_train_and_eval_outputs(backbone_name, truncation):
    torch.manual_seed(0)
    model = small_model(backbone_name, truncation)
    losses = model([torch.rand(3, 64, 64)], [lesion_target(64, 64, 2)])
    assert set(losses) == LOSS_KEYS
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.conv1.weight.grad is not None
    model.eval()
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 64, 80)])
    check_detections(out, 64, 80, num_classes=3)
    assert out["boxes"].shape[0] > 0  # untrained 3-class heads score every class above 0.05


def test_backbone_feeds_expected_levels():
    light = small_model("resnet34", 2).backbone
    assert light.body.returned == ("layer2",) and not hasattr(light.body, "layer3")
    assert light.fpn.inner_blocks[0][0].in_channels == 128
    full = small_model("resnet50", 0).backbone
    assert full.body.returned == ("layer1", "layer2", "layer3", "layer4")
    assert [b[0].in_channels for b in full.fpn.inner_blocks] == [256, 512, 1024, 2048]


def test_empty_target_trains_with_zero_box_and_mask_loss():
    torch.manual_seed(0)
    model = small_model()
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
             "masks": torch.zeros((0, 64, 64), dtype=torch.uint8)}
    losses = model([torch.rand(3, 64, 64)], [empty])
    assert torch.isfinite(sum(losses.values()))
    for key in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask"):
        assert losses[key].item() == 0.0, key
    assert losses["loss_objectness"].item() > 0 and losses["loss_classifier"].item() > 0
    sum(losses.values()).backward()


def test_batch_of_two_with_different_sizes():
    torch.manual_seed(0)
    model = small_model()
    images = [torch.rand(3, 64, 64), torch.rand(3, 72, 96)]
    losses = model(images, [lesion_target(64, 64, 1), lesion_target(72, 96, 3, label=2)])
    assert set(losses) == LOSS_KEYS and torch.isfinite(sum(losses.values()))
    model.eval()
    with torch.inference_mode():
        outs = model(images)
    assert len(outs) == 2
    check_detections(outs[0], 64, 64, 3)
    check_detections(outs[1], 72, 96, 3)


def _torchvision_and_preset() -> tuple[torch.nn.Module, torch.nn.Module]:
    """torchvision's maskrcnn_resnet50_fpn (random weights) and our preset with its state dict."""
    torch.manual_seed(0)
    settings = dict(min_size=128, max_size=128, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=200,
                    box_detections_per_img=25)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                                   **settings).eval()
    ours = maskrcnn_resnet_fpn(backbone_name="resnet50", truncation=0, num_classes=3, preset="torchvision",
                               **settings).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(reference.state_dict())
    return reference, ours


def _assert_same_detections(got: dict, want: dict, *, boxes: float, scores: float, masks: float) -> None:
    assert want["boxes"].shape[0] > 0
    assert torch.equal(want["labels"], got["labels"])
    for key, tolerance in (("boxes", boxes), ("scores", scores), ("masks", masks)):
        torch.testing.assert_close(got[key], want[key], atol=tolerance, rtol=0)


def test_torchvision_preset_matches_torchvision():
    reference, ours = _torchvision_and_preset()
    image = [torch.rand(3, 128, 112)]
    with torch.inference_mode():
        (want,), (got,) = reference(image), ours(image)
    _assert_same_detections(got, want, boxes=1e-4, scores=1e-4, masks=1e-4)


def test_fused_torchvision_preset_matches_torchvision():
    """Every inference form at once on a multi-level model: fused bottlenecks, gather pooling from
    four levels, the box branch in chunks (64 of the 200 proposals at a time), channels-last fc6.
    The tolerances allow for float rounding through a random-weight ResNet50 (the fused copy of
    the previous stage already differed by 0.003 px and 0.0015 in mask probability here)."""
    reference, ours = _torchvision_and_preset()
    fused = fast_inference_copy(ours)
    assert type(fused.roi_heads) is InferenceRoIHeads and type(fused.roi_heads.box_head) is ChannelsLastTwoMLPHead
    assert all(type(b) is InferenceBottleneck for b in fused.backbone.body.layer3)
    fused.roi_heads.box_chunk = 64
    image = [torch.rand(3, 128, 112)]
    with torch.inference_mode():
        (want,), (got,) = reference(image), fused(image)
    _assert_same_detections(got, want, boxes=1e-2, scores=1e-3, masks=1e-2)


def _parameters_of_resnet_up_to_layer3(name: str) -> int:
    with torch.device("meta"):
        net = getattr(torchvision.models, name)()
    return sum(p.numel() for n, p in net.named_parameters() if not n.startswith(("layer4", "fc")))


def test_parameter_counts_reproduce_published_figures():
    def millions(name, t):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = maskrcnn_resnet_fpn(backbone_name=name, truncation=t, num_classes=2)
        return sum(p.numel() for p in model.parameters()) / 1e6

    r34, r18, r50 = millions("resnet34", 1), millions("resnet18", 1), millions("resnet50", 0)
    assert math.isclose(r34, 11.45, rel_tol=0.01)
    assert math.isclose(r50, 31.78, rel_tol=0.01)
    # Documented exception: the published ResNet18 figure (6.12M) is 1.1% above ours. Both lightweight
    # models share heads and FPN, so their difference must be the ResNet34 - ResNet18 difference up to
    # layer3 (5.39M); the published pair differs by 5.33M, so at most one of its figures is exact.
    body_diff = (_parameters_of_resnet_up_to_layer3("resnet34") - _parameters_of_resnet_up_to_layer3("resnet18")) / 1e6
    assert math.isclose(r34 - r18, body_diff, abs_tol=1e-9)
    assert math.isclose(r18, 6.12, rel_tol=0.012)


def test_pretrained_backbone_is_loaded(tmp_path):
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18()
    with torch.no_grad():
        resnet.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = small_model("resnet18", 1, pretrained_backbone=str(path))
    body = model.backbone.body.state_dict()
    for key, value in body.items():
        assert torch.equal(value, resnet.state_dict()[key]), key
    assert not torch.equal(small_model("resnet18", 1).backbone.body.conv1.weight, resnet.conv1.weight)


def test_pretrained_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        small_model(pretrained_backbone=str(tmp_path / "missing.pth"))
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match="resnet34.pth"):
        small_model("resnet34", 1, pretrained_backbone=str(path))


@pytest.mark.parametrize("kwargs,message", [
    (dict(backbone_name="resnet101", truncation=0), "backbone_name must be one of"),
    (dict(backbone_name="resnet18", truncation=3), "truncation must be 0, 1 or 2, got 3"),
    (dict(backbone_name="resnet50", truncation=1), "truncation must be 0"),
    (dict(backbone_name="resnet18", truncation=1, num_classes=1), "num_classes"),
    (dict(backbone_name="resnet18", truncation=1, preset="detectron"), "preset must be one of"),
    (dict(backbone_name="resnet18", truncation=1, preset="torchvision"), "backbone_name must be 'resnet50'"),
    (dict(backbone_name="resnet18", truncation=1, rpn_nms=0.7), "unknown builder options"),
    (dict(backbone_name="resnet18", truncation=1, norm="group"), "norm must be"),
    (dict(backbone_name="resnet50", truncation=0, anchor_sizes=((2,), (4,))), "anchor_sizes gives 2 levels"),
])
def test_builder_rejects_bad_choices(kwargs, message):
    kwargs.setdefault("num_classes", 2)
    with pytest.raises(ValueError, match=message):
        maskrcnn_resnet_fpn(**kwargs)


def test_builder_is_keyword_only():
    with pytest.raises(TypeError):
        maskrcnn_resnet_fpn("resnet18", 1, 2)


def test_bad_targets_and_images_are_named():
    model = small_model()
    target = lesion_target(64, 64, 1)
    with pytest.raises(ValueError, match="target 0: boxes"):
        model([torch.rand(3, 64, 64)], [dict(target, boxes=target["boxes"].long())])
    with pytest.raises(ValueError, match="target 0: boxes need x1 > x0"):
        model([torch.rand(3, 64, 64)], [dict(target, boxes=torch.tensor([[10.0, 10.0, 5.0, 20.0]]))])
    with pytest.raises(ValueError, match="target 0: labels"):
        model([torch.rand(3, 64, 64)], [dict(target, labels=target["labels"].int())])
    model.eval()
    with pytest.raises(ValueError, match="image 1 must be a tensor of shape"):
        model([torch.rand(3, 64, 64), torch.rand(64, 64)])




@pytest.mark.parametrize("norm", ["batchnorm", "frozen"])
def test_folded_batchnorm_gives_the_same_detections(norm):
    model = small_model("resnet18", 1, norm=norm).eval()
    randomise_batchnorm(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fast_inference_copy(model)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)) for m in fused.modules())
    assert not any(isinstance(m, WinogradConv2d) for m in fused.backbone.body.modules())
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fused.backbone.body.modules() if isinstance(m, torch.nn.Conv2d))
    assert any(isinstance(m, WinogradConv2d) for m in fused.backbone.fpn.modules())
    assert any(isinstance(m, WinogradConv2d) for m in fused.roi_heads.mask_head.modules())
    assert type(fused.backbone.fpn) is InferenceFPN and type(fused.rpn.head) is InferenceRPNHead
    assert all(type(b) is InferenceBasicBlock for b in fused.backbone.body.layer1)
    image = [torch.rand(3, 64, 72)]
    with torch.inference_mode():
        (want,), (got,) = model(image), fused(image)
    assert want["boxes"].shape[0] > 0 and torch.equal(want["labels"], got["labels"])
    for key in ("boxes", "scores", "masks"):
        torch.testing.assert_close(got[key], want[key], atol=1e-3, rtol=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_training_model_pools_with_torchvisions_multiscale_roialign():
    heads = small_model().roi_heads
    assert type(heads.box_roi_pool) is MultiScaleRoIAlign and type(heads.mask_roi_pool) is MultiScaleRoIAlign


def test_training_with_gather_poolers_gives_torchvisions_losses_and_gradients():
    """The trainers' CPU poolers (``use_gather_poolers``): same losses and gradients as torchvision's, to rounding."""
    results = []
    for gather in (False, True):
        torch.manual_seed(0)
        model = small_model(truncation=2, box_fg_iou_thresh=0.5)
        if gather:
            use_gather_poolers(model.roi_heads)
            assert type(model.roi_heads.box_roi_pool) is GatherMultiScaleRoIAlign
        torch.manual_seed(1)
        images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
        losses = model(images, [lesion_target(64, 80, 2), lesion_target(64, 80, 1, label=2)])
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    assert set(got_grads) == set(want_grads)
    for key in LOSS_KEYS:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
    assert want["loss_mask"] > 0


def test_fast_copy_is_new_and_leaves_the_model_and_its_checkpoint_as_they_were(tmp_path):
    torch.manual_seed(0)
    model = small_model("resnet18", 1)
    randomise_batchnorm(model)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    image = [torch.rand(3, 64, 72)]
    with torch.inference_mode():
        (before,) = model.eval()(image)
    model.train()
    state, kinds = {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fast_inference_copy(model)
    assert bool(kernels.missing()) == any(issubclass(w.category, FastPathFallbackWarning) for w in caught)
    assert fast is not model and model.training and not fast.training
    assert [type(m) for m in model.modules()] == kinds
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in state.items())
    ours = {t.untyped_storage().data_ptr() for t in after.values() if t.numel()}
    assert not ours & {t.untyped_storage().data_ptr() for t in fast.state_dict().values() if t.numel()}
    model.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), strict=True)
    with torch.inference_mode():
        fast(image)
        (again,) = model.eval()(image)
    assert set(again) == set(before) and all(torch.equal(again[k], before[k]) for k in before)


PRIVATE_APIS = ["torch._nnpack_available", "torch._nnpack_spatial_convolution",
                "torch.ops.mkldnn._convolution_pointwise", "torchvision.ops.poolers._setup_scales"]


def _remove_private_api(monkeypatch, name: str) -> None:
    """Take ``name`` away as a future release might (the oneDNN ops: their whole namespace)."""
    if name.startswith("torch.ops.mkldnn."):
        monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())
    elif name.startswith("torch."):
        monkeypatch.delattr(torch, name.removeprefix("torch."))
    else:
        monkeypatch.delattr(torchvision.ops.poolers, name.rsplit(".", 1)[1])


@pytest.mark.parametrize("names", [[name] for name in PRIVATE_APIS] + [PRIVATE_APIS])
def test_fast_copy_without_a_private_kernel_warns_once_and_gives_the_plain_detections(monkeypatch, names):
    torch.manual_seed(0)
    model = small_model("resnet18", 1).eval()
    randomise_batchnorm(model)
    image = [torch.rand(3, 64, 72)]
    with torch.inference_mode():  # first, while torchvision's pooler still has its scale helper to set its scales
        (want,) = model(image)
    for name in names:
        _remove_private_api(monkeypatch, name)
    assert set(names) <= set(kernels.missing())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fast_inference_copy(model)
    fallbacks = [w for w in caught if issubclass(w.category, FastPathFallbackWarning)]
    assert len(fallbacks) == 1 and all(name in str(fallbacks[0].message) for name in names)
    with torch.inference_mode():
        (got,) = fast(image)
    assert want["boxes"].shape[0] > 0 and torch.equal(want["labels"], got["labels"])
    for key in ("boxes", "scores", "masks"):
        torch.testing.assert_close(got[key], want[key], atol=1e-3, rtol=1e-3)


def test_batchnorm_affine_trainable_with_frozen_statistics():
    model = small_model()
    model.train()
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.eval()
    stats = [m.running_mean.clone() for m in norms]
    sum(model([torch.rand(3, 64, 64)], [lesion_target(64, 64, 1)]).values()).backward()
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, norms))
    assert all(m.weight.grad is not None for m in norms)


def test_mask_logits_for_labels_equal_full_prediction():
    torch.manual_seed(0)
    predictor = MaskPredictor(32, 16, num_classes=3)
    torch.nn.init.normal_(predictor.conv5_mask.bias)
    torch.nn.init.normal_(predictor.mask_fcn_logits.bias)
    x, labels = torch.randn(5, 32, 14, 14), torch.tensor([1, 2, 0, 2, 1])
    full = predictor(x)[torch.arange(5), labels][:, None]
    torch.testing.assert_close(predictor.forward_for_labels(x, labels), full, atol=1e-5, rtol=1e-5)


def test_paste_masks_matches_torchvision():
    torch.manual_seed(0)
    masks = torch.rand(40, 1, 28, 28)
    corner = torch.rand(40, 2) * torch.tensor([70.0, 60.0])
    boxes = torch.cat([corner, corner + torch.rand(40, 2) * 40 + 0.02], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=80)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=64)
    boxes[:3] = torch.tensor([[0.0, 0.0, 80.0, 64.0], [0.0, 0.0, 0.3, 0.2], [79.0, 60.0, 80.0, 64.0]])
    torch.testing.assert_close(paste_masks(masks, boxes, (64, 80)), paste_masks_in_image(masks, boxes, (64, 80)),
                               atol=1e-5, rtol=0)
    assert paste_masks(masks[:0], boxes[:0], (64, 80)).shape == (0, 1, 64, 80)


def test_roi_head_steps_give_ranked_rows_and_the_detections():
    torch.manual_seed(0)
    model = small_model(num_classes=3).eval()
    batch, _ = model.transform([torch.rand(3, 64, 64)])
    with torch.inference_mode():
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        heads = model.roi_heads
        logits, deltas = heads.box_outputs(features, proposals, batch.image_sizes)
        (cand,) = heads.candidates(logits, deltas, proposals, batch.image_sizes)
        keep = heads.select(cand, score_thresh=-1.0, nms_thresh=0.5, max_detections=16)
        (dets,) = heads.detect(features, proposals, batch.image_sizes)
    rows = torch.cat([cand["scores"][keep, None], cand["deltas"][keep]], dim=1)
    assert rows.shape == (16, 5) and (rows[:-1, 0] >= rows[1:, 0]).all()
    assert torch.allclose(cand["deltas"].view(-1, 2, 4), deltas.view(-1, 3, 4)[:, 1:])
    again = heads.select(cand, score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh,
                         max_detections=heads.detections_per_img)
    assert torch.equal(cand["boxes"][again], dets["boxes"]) and torch.equal(cand["scores"][again], dets["scores"])
