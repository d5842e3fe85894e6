"""COVID-CT-Mask-Net: ranked rows and their fill, determinism, what trains, parameter table, weight loading."""
import pytest
import torch
from torch import nn

from models.mask_net import maskrcnn_resnet_fpn
from models.mask_net.covid_mask_net import (
    CLASSIFIER_BUILDER,
    SEGMENTATION_BUILDER,
    ClassificationModuleS,
    covid_mask_net,
    fill_ranked_rows,
    load_segmentation_weights,
)
from models.mask_net.workflows.loops import train_one_epoch
from models.summary import ORIGINAL_PARAMETER_TABLE, format_parameter_table, parameter_counts, parameter_table
from utils.checkpoint import resolve_builder

TINY = dict(backbone_name="resnet18", truncation=1, num_classes=3, min_size=64, max_size=64,
            rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)



def tiny_model(roi_batch_size=16, s_features=32, **overrides):
    torch.manual_seed(0)
    return covid_mask_net(**{**TINY, **overrides}, roi_batch_size=roi_batch_size, s_features=s_features)


def images(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(n)]


def s_parameter_count(b, f):
    return (5 * b * f + f) + (f * f + f) + (f * 3 + 3)


def test_s_module_layers_and_logits_shape():
    s = ClassificationModuleS(roi_batch_size=4, s_features=8)
    assert [type(m) for m in s] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert (s[0].in_features, s[0].out_features, s[2].out_features, s[4].out_features) == (20, 8, 8, 3)
    assert sum(p.numel() for p in s.parameters()) == s_parameter_count(4, 8)


def test_fill_repeats_survivors_in_score_order_and_zero_pads():
    rows = [torch.arange(15.0).reshape(3, 5), torch.zeros(0, 5), torch.arange(50.0).reshape(10, 5)]
    out = fill_ranked_rows(rows, 8)
    assert out.shape == (3, 8, 5)
    # 3 survivors over 8 slots: slot j holds survivor floor(3j/8) -> runs 0,0,0,1,1,1,2,2
    assert out[0, :, 0].tolist() == [0, 0, 0, 5, 5, 5, 10, 10]
    assert torch.equal(out[1], torch.zeros(8, 5))
    assert torch.equal(out[2], rows[2][:8])


def test_batch_of_logits_and_rows_are_deterministic_when_fewer_than_b_survive():
    model = tiny_model(roi_batch_size=256).eval()  # at most 100 proposals x 2 classes
    with torch.no_grad():
        survivors = model.surviving_detections(images())
        assert all(0 < r.shape[0] < 256 for r in survivors), [r.shape for r in survivors]
        assert all(torch.all(r[:-1, 0] >= r[1:, 0]) for r in survivors), "rows are ranked by score"
        first, second = model(images()), model(images())
        rows = model.ranked_detections(images())
    assert first.shape == (2, 3) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert torch.equal(rows[0, 0], survivors[0][0]) and torch.equal(rows[0, -1], survivors[0][-1])


def test_no_surviving_detection_gives_zero_rows_and_identical_logits():
    model = tiny_model(rpn_score_thresh=1.5).eval()  # objectness is a probability: no proposal passes
    with torch.no_grad():
        assert all(r.shape[0] == 0 for r in model.surviving_detections(images()))
        rows = model.ranked_detections(images())
        first, second = model(images()), model(images())
    assert torch.equal(rows, torch.zeros(2, 16, 5))
    assert torch.equal(first, second) and torch.isfinite(first).all()


def test_per_class_rows_put_each_score_in_its_class_column_and_keep_the_shared_rows_deltas():
    shared, per_class = tiny_model(roi_batch_size=256).eval(), tiny_model(roi_batch_size=256, score_columns="per_class")
    per_class.load_state_dict({k: v for k, v in shared.state_dict().items() if not k.startswith("s_module.0.")},
                              strict=False)  # same detector; only S's first layer differs in shape
    per_class.eval()
    with torch.no_grad():
        old, new = shared.surviving_detections(images()), per_class.surviving_detections(images())
        logits = per_class(images())
    assert per_class.s_module[0].in_features == 6 * 256 and shared.s_module[0].in_features == 5 * 256
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    for o, n in zip(old, new):
        assert n.shape == (o.shape[0], 6)  # [s_GGO, s_consolidation, dx, dy, dw, dh]
        assert torch.equal(n[:, 2:], o[:, 1:]), "same survivors, same order, same deltas"
        assert torch.equal(n[:, :2].sum(dim=1), o[:, 0]) and ((n[:, :2] > 0).sum(dim=1) <= 1).all()
        assert (n[:, 0] > 0).any() and (n[:, 1] > 0).any(), "both lesion classes appear among the survivors"


def test_per_class_rows_of_one_lesion_class_are_the_original_rows():
    shared = tiny_model(num_classes=2).eval()
    per_class = tiny_model(num_classes=2, score_columns="per_class").eval()
    assert set(shared.state_dict()) == set(per_class.state_dict())
    per_class.load_state_dict(shared.state_dict())
    with torch.no_grad():
        assert torch.equal(shared(images()), per_class(images()))


def test_empty_per_class_rows_are_zero_rows_of_the_per_class_width():
    model = tiny_model(rpn_score_thresh=1.5, score_columns="per_class").eval()
    with torch.no_grad():
        assert torch.equal(model.ranked_detections(images()), torch.zeros(2, 16, 6))


def expected_trainable(model):
    names = {f"s_module.{n}" for n, _ in model.s_module.named_parameters()}
    for module_name, module in model.backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            names |= {f"backbone.{module_name}.weight", f"backbone.{module_name}.bias"}
    return names


def test_only_s_and_batchnorm_affine_require_and_receive_gradients():
    model = tiny_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model)
    assert any("bn" in n for n in trainable) and any(n.startswith("s_module") for n in trainable)
    model.train()
    model(images()).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("bn1.weight"))


def test_training_step_keeps_batchnorm_statistics_and_frozen_weights():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = [(images(), torch.tensor([0, 2]))]
    loss_fn = lambda m, x, y: {"loss": nn.functional.cross_entropy(m(x), y)}  # noqa: E731
    train_one_epoch(model, loader, optimizer, device=torch.device("cpu"), epoch=0, loss_fn=loss_fn, progress=False)
    after = model.state_dict()
    trainable = expected_trainable(model)
    for key, value in before.items():
        if "running_" in key or "num_batches_tracked" in key:
            assert torch.equal(after[key], value), f"BatchNorm statistic changed: {key}"
        elif key not in trainable:
            assert torch.equal(after[key], value), f"frozen tensor changed: {key}"
    assert not torch.equal(after["s_module.0.weight"], before["s_module.0.weight"])
    assert not torch.equal(after["backbone.body.bn1.weight"], before["backbone.body.bn1.weight"])
    assert model.training and not model.backbone.training, "the detector stays in eval mode while S trains"


def test_segmentation_weights_load_by_name_without_mask_branch():
    torch.manual_seed(3)
    seg = maskrcnn_resnet_fpn(**TINY)
    model = tiny_model()
    counts = load_segmentation_weights(model, seg.state_dict())
    seg_state, own = seg.state_dict(), model.state_dict()
    mask_keys = [k for k in seg_state if ".mask_" in k]
    assert counts == {"loaded": len(seg_state) - len(mask_keys), "ignored_mask": len(mask_keys),
                      "new": len([k for k in own if k.startswith("s_module.")])}
    assert all(torch.equal(own[k], v) for k, v in seg_state.items() if k in own)


def test_segmentation_weights_of_another_architecture_are_refused():
    seg = maskrcnn_resnet_fpn(**{**TINY, "num_classes": 2})
    with pytest.raises(ValueError, match="seg.pth has tensors of other shapes.*box_predictor"):
        load_segmentation_weights(tiny_model(), seg.state_dict(), source="seg.pth")


@pytest.mark.parametrize("kwargs, message", [
    (dict(roi_batch_size=0), "roi_batch_size must be a positive int"),
    (dict(s_features=2.5), "s_features must be a positive int"),
    (dict(with_masks=True), "sets \\['with_masks'\\] itself"),
    (dict(truncation=3), "truncation must be 0, 1 or 2"),
    (dict(score_columns="per_lesion"), "score_columns must be one of"),
])
def test_builder_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        covid_mask_net(**{**TINY, "roi_batch_size": 8, "s_features": 8, **kwargs})


def test_parameter_table_reproduces_published_figures():
    rows = parameter_table()
    assert len(rows) == len(ORIGINAL_PARAMETER_TABLE)
    for row, ((backbone, truncation, b, f), _) in zip(rows, ORIGINAL_PARAMETER_TABLE.items()):
        with torch.device("meta"):
            seg = maskrcnn_resnet_fpn(backbone_name=backbone, truncation=truncation, num_classes=2)
        seg_total = sum(p.numel() for p in seg.parameters())
        mask_branch = sum(p.numel() for n, p in seg.named_parameters() if ".mask_" in n)
        batchnorm = sum(p.numel() for m in seg.backbone.modules() if isinstance(m, nn.BatchNorm2d)
                        for p in m.parameters())
        # independent count: the segmentation model without its mask branch, plus S
        assert row["total"] == seg_total - mask_branch + s_parameter_count(b, f)
        assert row["trainable"] == s_parameter_count(b, f) + batchnorm
        assert abs(row["total_diff"]) <= 0.01 or row["notes"], row["model"]
        assert abs(row["trainable_diff"]) <= 0.01 or row["notes"], row["model"]
        if backbone != "resnet50":
            assert round(row["trainable"] / 1e6, 1) == row["original_trainable"]
    text = format_parameter_table(rows)
    assert "24.86M" in text and "note:" in text


def test_resnet50_published_trainable_is_s_alone():
    with torch.device("meta"):
        model = covid_mask_net(backbone_name="resnet50", truncation=0, num_classes=2, roi_batch_size=256,
                               s_features=1024, norm="frozen")
    _, trainable = parameter_counts(model)
    assert trainable == s_parameter_count(256, 1024)
    assert abs(trainable / 2.36e6 - 1) < 0.01


def test_builder_ids_name_the_builders():
    assert resolve_builder(SEGMENTATION_BUILDER) is maskrcnn_resnet_fpn
    assert resolve_builder(CLASSIFIER_BUILDER) is covid_mask_net


def test_classifier_loaded_for_cpu_inference_pools_by_gathers_with_the_same_logits(tmp_path):
    from torchvision.ops import MultiScaleRoIAlign

    from models.mask_net.fast.poolers import GatherMultiScaleRoIAlign
    from models.mask_net.workflows.classifier_evaluation import load_classifier
    from utils.checkpoint import make_checkpoint, save_checkpoint

    kwargs = dict(**TINY, roi_batch_size=16, s_features=32)
    model = tiny_model().eval()
    path = save_checkpoint(make_checkpoint(model=model, builder=CLASSIFIER_BUILDER, builder_kwargs=kwargs, epoch=0,
                                           mask_type="both"), tmp_path / "cls.pth")
    loaded, _ = load_classifier(str(path), flags={}, device=torch.device("cpu"))
    assert type(model.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert isinstance(loaded.roi_heads.box_roi_pool, GatherMultiScaleRoIAlign)
    with torch.inference_mode():
        expected, got = model(images(3)), loaded(images(3))
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with_amp, _ = load_classifier(str(path), flags={}, device=torch.device("cpu"), amp=True)
    assert type(with_amp.roi_heads.box_roi_pool) is MultiScaleRoIAlign  # mixed precision keeps torchvision's
