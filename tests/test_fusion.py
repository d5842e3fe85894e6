"""The inference-only stages of models/mask_net/fast/ against the modules they stand in for."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models.mask_net.box_head import FastRCNNPredictor, TwoMLPHead
from models.mask_net.fast import kernels
from models.mask_net.fast import roi_heads as fast_roi_heads
from models.mask_net.fast.fusion import (
    InferenceBasicBlock,
    InferenceBottleneck,
    InferenceFPN,
    InferenceRPNHead,
    WinogradConv2d,
    add_upsampled_,
    conv1x1,
    fold_batchnorm,
    use_fused_residual_blocks,
    use_inference_fpn_and_rpn_head,
    use_winograd_convolutions,
)
from models.mask_net.fast.poolers import GatherMultiScaleRoIAlign, LevelRows, ParallelMultiScaleRoIAlign
from models.mask_net.fast.roi_heads import ChannelsLastTwoMLPHead, InferenceRoIHeads, use_gather_pooling
from models.mask_net.mask_head import MaskPredictor
from models.mask_net.roi_heads import RoIHeads
from models.mask_net.rpn import RPNHead
from tests.helpers import randomise_batchnorm

_FUSED = {Bottleneck: InferenceBottleneck, BasicBlock: InferenceBasicBlock}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv1x1_matches_conv2d_and_writes_nchw(channels_last, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(4, 6, 1, 1), torch.randn(4) if with_bias else None
    got = conv1x1(x, weight, bias)
    torch.testing.assert_close(got, F.conv2d(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert got.is_contiguous()


@pytest.mark.parametrize("fine_size", [(8, 6), (7, 5), (13, 9)])
def test_add_upsampled_matches_nearest_interpolation(fine_size):
    torch.manual_seed(0)
    fine, coarse = torch.randn(2, 3, *fine_size), torch.randn(2, 3, 4, 3)
    want = fine + F.interpolate(coarse, size=fine_size, mode="nearest")
    got = add_upsampled_(fine, coarse)
    assert got is fine
    assert torch.equal(got, want)


def _fpn_inputs(channels: list[int], sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {str(i): torch.randn(2, c, *s).to(memory_format=torch.channels_last) for i, (c, s) in
            enumerate(zip(channels, sizes))}


@pytest.mark.parametrize("sizes", [[(16, 12), (8, 6), (4, 3)], [(15, 11), (8, 6), (4, 3)]])
@pytest.mark.parametrize("extra", [None, LastLevelMaxPool])
def test_inference_fpn_matches_torchvision(sizes, extra):
    torch.manual_seed(0)
    channels = [8, 16, 32]
    reference = FeaturePyramidNetwork(channels, 12, extra_blocks=extra() if extra else None).eval()
    fast = use_inference_fpn_and_rpn_head(copy.deepcopy(reference))
    assert type(fast) is InferenceFPN
    x = _fpn_inputs(channels, sizes)
    with torch.inference_mode():
        want, got = reference(x), fast(x)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)


def test_inference_fpn_with_gradients_runs_the_parent():
    torch.manual_seed(0)
    fpn = use_inference_fpn_and_rpn_head(FeaturePyramidNetwork([8, 16], 12))
    x = _fpn_inputs([8, 16], [(8, 8), (4, 4)])
    out = fpn(x)
    sum(v.sum() for v in out.values()).backward()
    assert fpn.inner_blocks[0][0].weight.grad is not None


def test_inference_rpn_head_matches_rpn_head():
    torch.manual_seed(0)
    reference = RPNHead(12, num_anchors=3).eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p)
    fast = use_inference_fpn_and_rpn_head(copy.deepcopy(reference))
    assert type(fast) is InferenceRPNHead
    features = [torch.randn(2, 12, 10, 8), torch.randn(2, 12, 5, 4)]
    with torch.inference_mode():
        (want_obj, want_deltas), (got_obj, got_deltas) = reference(features), fast(features)
    for got, want in zip(got_obj + got_deltas, want_obj + want_deltas):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("num_rois, chunk", [(0, 8), (5, 2), (5, 8), (9, 3)])
def test_mask_logits_for_labels_in_chunks(num_rois, chunk):
    torch.manual_seed(0)
    predictor = MaskPredictor(16, 8, num_classes=3)
    torch.nn.init.normal_(predictor.conv5_mask.bias)
    x, labels = torch.randn(num_rois, 16, 7, 7), torch.randint(0, 3, (num_rois,))
    full = predictor(x)[torch.arange(num_rois), labels][:, None]
    got = predictor.forward_for_labels(x, labels, chunk=chunk)
    assert got.shape == (num_rois, 1, 14, 14)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def _stage(block_type, channels: int, stride: int) -> torch.nn.Sequential:
    """Two torchvision blocks as in a ResNet stage: the first with a downsample branch, the second without."""
    out = channels * block_type.expansion
    downsample = torch.nn.Sequential(torch.nn.Conv2d(8, out, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(out))
    stage = torch.nn.Sequential(block_type(8, channels, stride=stride, downsample=downsample),
                                block_type(out, channels)).eval()
    randomise_batchnorm(stage)
    return stage


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused blocks need oneDNN")
@pytest.mark.parametrize("block_type", [Bottleneck, BasicBlock])
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_residual_blocks_match_torchvision_blocks(block_type, stride):
    torch.manual_seed(0)
    reference = _stage(block_type, 4, stride)
    fused = use_fused_residual_blocks(fold_batchnorm(copy.deepcopy(reference)).to(memory_format=torch.channels_last))
    assert type(fused[0]) is _FUSED[block_type] and [b.owns_input for b in fused] == [False, True]
    x = torch.randn(2, 8, 9, 11).to(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.inference_mode():
        want = reference(x)
        hidden = fused[0](x)
        hidden_storage = hidden.data_ptr()
        got = fused[1](hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, kept), "a block that does not own its input must leave it unchanged"
    assert got.data_ptr() == hidden_storage, "the second block's sum is written over its input"


def test_unfolded_blocks_stay_torchvision_blocks():
    stage = _stage(Bottleneck, 4, 1)
    use_fused_residual_blocks(stage)
    assert [type(b) for b in stage] == [Bottleneck, Bottleneck]


def test_fused_block_with_gradients_runs_the_parent():
    torch.manual_seed(0)
    stage = use_fused_residual_blocks(fold_batchnorm(_stage(BasicBlock, 4, 1)))
    stage(torch.randn(1, 8, 6, 6)).sum().backward()
    assert stage[0].conv1.weight.grad is not None


def _box_only_roi_heads(box_head: torch.nn.Module) -> RoIHeads:
    """RoI heads on one 6-channel level with 3x3 box pooling, a 10-wide ``box_head`` and 3 classes."""
    return RoIHeads(box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=3, sampling_ratio=2),
                    box_head=box_head, box_predictor=FastRCNNPredictor(10, 3), mask_roi_pool=None, mask_head=None,
                    mask_predictor=None, fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=8,
                    positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05,
                    nms_thresh=0.5, detections_per_img=10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_box_head_with_permuted_fc6_matches_the_head(channels_last):
    torch.manual_seed(0)
    reference = TwoMLPHead(6 * 3 * 3, 10)
    roi_heads = use_gather_pooling(_box_only_roi_heads(copy.deepcopy(reference)))
    assert type(roi_heads) is InferenceRoIHeads and type(roi_heads.box_head) is ChannelsLastTwoMLPHead
    assert type(roi_heads.box_roi_pool) is GatherMultiScaleRoIAlign
    x = torch.randn(5, 6, 3, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_heads.box_head(x), reference(x), atol=1e-5, rtol=1e-5)


def test_inference_roi_heads_build_no_table_for_a_slice_without_proposals(monkeypatch):
    torch.manual_seed(0)
    reference = _box_only_roi_heads(TwoMLPHead(6 * 3 * 3, 10)).eval()
    fused = use_gather_pooling(copy.deepcopy(reference))
    features = {"0": torch.randn(1, 6, 8, 8)}
    tables = []
    monkeypatch.setattr(fast_roi_heads, "LevelRows", lambda maps: tables.append(maps) or LevelRows(maps))
    with torch.inference_mode():
        (want,), _ = reference(features, [torch.zeros((0, 4))], [(32, 32)])
        (got,), _ = fused(features, [torch.zeros((0, 4))], [(32, 32)])
        assert not tables
        fused(features, [torch.tensor([[2.0, 3.0, 20.0, 25.0]])], [(32, 32)])
        assert len(tables) == 1
    assert got["boxes"].shape == want["boxes"].shape == (0, 4)


@pytest.mark.parametrize("shape,path", [((1, 8, 31, 30), "per_image"), ((3, 8, 30, 33), "per_image"),
                                        ((20, 8, 14, 14), "batched"), ((2, 8, 14, 14), "direct"),
                                        ((1, 8, 13, 13), "direct")])
def test_winograd_convolution_matches_conv2d_on_each_path(shape, path):
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(8, 6, 3, padding=1)
    fast = use_winograd_convolutions(torch.nn.Sequential(copy.deepcopy(reference)))[0]
    assert type(fast) is WinogradConv2d
    x = torch.randn(*shape)
    with torch.inference_mode():
        if kernels.nnpack_usable():
            assert fast.path(x) == path
        torch.testing.assert_close(fast(x), reference(x), atol=1e-4, rtol=1e-4)
    assert fast.path(torch.randn(*shape, requires_grad=True)) == "direct"


def test_adaptive_sampling_gets_threaded_poolers_and_the_plain_roi_heads():
    heads = _box_only_roi_heads(TwoMLPHead(6 * 3 * 3, 10))
    heads.box_roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=3, sampling_ratio=0)
    fast = use_gather_pooling(heads)
    assert type(fast) is RoIHeads and type(fast.box_head) is TwoMLPHead
    assert type(fast.box_roi_pool) is ParallelMultiScaleRoIAlign and fast.box_roi_pool.sampling_ratio == 0


@pytest.mark.parametrize("name", ["_nnpack_available", "_nnpack_spatial_convolution"])
def test_winograd_convolution_without_nnpack_runs_the_parent(monkeypatch, name):
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(8, 6, 3, padding=1)
    fast = use_winograd_convolutions(torch.nn.Sequential(copy.deepcopy(reference)))[0]
    monkeypatch.delattr(torch, name)
    assert f"torch.{name}" in kernels.missing() and not kernels.nnpack_usable()
    x = torch.randn(2, 8, 31, 30)
    with torch.inference_mode():
        assert fast.path(x) == "direct"
        torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_type", [Bottleneck, BasicBlock])
def test_fused_blocks_without_the_onednn_ops_run_the_parent(monkeypatch, block_type):
    torch.manual_seed(0)
    reference = _stage(block_type, 4, 2)
    fused = use_fused_residual_blocks(fold_batchnorm(copy.deepcopy(reference)).to(memory_format=torch.channels_last))
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())
    assert "torch.ops.mkldnn._convolution_pointwise" in kernels.missing() and not kernels.fused_conv_usable()
    x = torch.randn(2, 8, 9, 11).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), reference(x), atol=1e-5, rtol=1e-5)


def test_roi_heads_stay_plain_without_torchvisions_scale_helper(monkeypatch):
    monkeypatch.delattr(torchvision.ops.poolers, "_setup_scales")
    heads = _box_only_roi_heads(TwoMLPHead(6 * 3 * 3, 10))
    fast = use_gather_pooling(heads)
    assert type(fast) is RoIHeads and type(fast.box_roi_pool) is MultiScaleRoIAlign
