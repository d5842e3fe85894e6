"""The threaded multi-scale RoIAlign gives torchvision's result exactly; the gather form, to float rounding."""
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from models.mask_net.fast.poolers import (
    GatherMultiScaleRoIAlign,
    LevelRows,
    ParallelMultiScaleRoIAlign,
    fast_pooler,
    filter_input,
    split_boxes,
)

LEVELS = ["0", "1", "2"]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _features(requires_grad: bool = False) -> OrderedDict:
    torch.manual_seed(0)
    return OrderedDict((name, torch.randn(2, 8, 64 // 2 ** i, 48 // 2 ** i, requires_grad=requires_grad))
                       for i, name in enumerate(LEVELS))


def _boxes(counts) -> list[torch.Tensor]:
    """Per image Float[n, 4] xyxy inside a 256 x 192 image, sizes spread over the levels."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([150.0, 200.0])
        wh = 4 + torch.rand(n, 2, generator=gen) * 150
        out.append(torch.cat([xy, xy + wh], dim=1))
    return out


def _poolers(size: int = 7):
    ours = ParallelMultiScaleRoIAlign(featmap_names=LEVELS, output_size=size, sampling_ratio=2)
    ours.min_rois_per_thread = 4
    return ours, MultiScaleRoIAlign(featmap_names=LEVELS, output_size=size, sampling_ratio=2)


@pytest.mark.parametrize("counts", [(5, 7), (0, 9), (9, 0), (1, 1), (0, 0)])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_boxes_keeps_every_roi_in_order(counts, parts):
    boxes = _boxes(counts)
    runs = split_boxes(boxes, parts)
    assert len(runs) == parts and all(len(run) == len(boxes) for run in runs)
    lengths = [sum(int(b.shape[0]) for b in run) for run in runs]
    assert sum(lengths) == sum(counts) and max(lengths) - min(lengths) <= 1
    for image in range(len(boxes)):  # each image's RoIs, run after run, are its RoIs in order
        assert torch.equal(torch.cat([run[image] for run in runs]), boxes[image])


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
@pytest.mark.parametrize("counts", [(40, 25), (0, 30), (17, 0)])
def test_threaded_pooling_equals_torchvision(two_threads, mode, counts):
    ours, reference = _poolers()
    features, boxes, shapes = _features(), _boxes(counts), [(256, 192), (256, 192)]
    assert ours._threads(features, boxes) == 2
    context = torch.inference_mode if mode == "inference" else torch.no_grad
    with context():
        got, want = ours(features, boxes, shapes), reference(features, boxes, shapes)
    assert got.shape == (sum(counts), 8, 7, 7)
    assert torch.equal(got, want)


def test_few_rois_or_gradients_use_the_parent_path(two_threads):
    ours, reference = _poolers(size=5)
    assert ours._threads(_features(), _boxes((3, 2))) == 1  # under min_rois_per_thread per thread
    features, boxes, shapes = _features(requires_grad=True), _boxes((30, 30)), [(256, 192), (256, 192)]
    assert ours._threads(features, boxes) == 1
    got = ours(features, boxes, shapes)
    got.sum().backward()
    grads = [features[name].grad.clone() for name in LEVELS]
    for name in LEVELS:
        features[name].grad = None
    reference(features, boxes, shapes).sum().backward()
    assert all(torch.equal(g, features[name].grad) for g, name in zip(grads, LEVELS))


def _boxes_over_the_border(counts) -> list[torch.Tensor]:
    """Per image Float[n, 4] xyxy of a 256 x 192 image: some reach past every border, some are under a pixel."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([230.0, 290.0]) - 20
        wh = 0.2 + torch.rand(n, 2, generator=gen) ** 3 * 200
        out.append(torch.cat([xy, xy + wh], dim=1))
    return out


@pytest.mark.parametrize("levels", [LEVELS, ["0"]])
@pytest.mark.parametrize("size,sampling", [(7, 2), (14, 2), (5, 1), (4, 3)])
@pytest.mark.parametrize("counts", [(40, 25), (0, 30)])
def test_gather_pooling_matches_torchvision(levels, size, sampling, counts):
    reference = MultiScaleRoIAlign(featmap_names=levels, output_size=size, sampling_ratio=sampling)
    ours = GatherMultiScaleRoIAlign(featmap_names=levels, output_size=size, sampling_ratio=sampling)
    features, boxes, shapes = _features(), _boxes_over_the_border(counts), [(256, 192), (256, 192)]
    with torch.inference_mode():
        want = reference(features, boxes, shapes)
        got_from_maps = ours(features, boxes, shapes)
        got_from_rows = ours(LevelRows(features), boxes, shapes)
    for got in (got_from_maps, got_from_rows):
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_level_rows_hold_every_pixel_at_its_row():
    features = _features()
    rows = LevelRows(features)
    for name, m in features.items():
        b, c, h, w = m.shape
        for image, y, x in ((0, 0, 0), (1, h - 1, w - 1), (1, h // 2, 3)):
            assert torch.equal(rows.table[rows.start[name] + (image * h + y) * w + x], m[image, :, y, x])


@pytest.mark.parametrize("size,sampling", [(7, 2), (14, 2)])
def test_gather_pooling_gradients_match_torchvision(size, sampling):
    reference = MultiScaleRoIAlign(featmap_names=LEVELS, output_size=size, sampling_ratio=sampling)
    ours = GatherMultiScaleRoIAlign(featmap_names=LEVELS, output_size=size, sampling_ratio=sampling)
    boxes, shapes = _boxes_over_the_border((40, 25)), [(256, 192), (256, 192)]
    upstream = torch.randn(65, 8, size, size, generator=torch.Generator().manual_seed(2))
    results = []
    for pool in (reference, ours):
        features = _features(requires_grad=True)
        out = pool(features, boxes, shapes)
        (out * upstream).sum().backward()
        results.append((out.detach(), [features[name].grad for name in LEVELS]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_gather_pooling_runs_the_parent_for_adaptive_sampling_and_no_rois():
    features, boxes, shapes = _features(), _boxes((20, 9)), [(256, 192), (256, 192)]
    adaptive = GatherMultiScaleRoIAlign(featmap_names=LEVELS, output_size=7, sampling_ratio=0)
    reference = MultiScaleRoIAlign(featmap_names=LEVELS, output_size=7, sampling_ratio=0)
    with torch.inference_mode():
        assert torch.equal(adaptive(features, boxes, shapes), reference(features, boxes, shapes))
    ours = GatherMultiScaleRoIAlign(featmap_names=LEVELS, output_size=5, sampling_ratio=2)
    assert ours(features, _boxes((0, 0)), shapes).shape == (0, 8, 5, 5)


def test_gather_pooling_in_double_precision():
    features = OrderedDict((name, m.double()) for name, m in _features().items())
    boxes, shapes = [b.double() for b in _boxes_over_the_border((12, 7))], [(256, 192), (256, 192)]
    reference = MultiScaleRoIAlign(featmap_names=LEVELS, output_size=7, sampling_ratio=2)
    ours = GatherMultiScaleRoIAlign(featmap_names=LEVELS, output_size=7, sampling_ratio=2)
    with torch.inference_mode():
        got, want = ours(features, boxes, shapes), reference(features, boxes, shapes)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("sampling,kind", [(2, GatherMultiScaleRoIAlign), (0, ParallelMultiScaleRoIAlign)])
def test_fast_pooler_is_a_new_pooler_with_the_same_settings_and_results(sampling, kind):
    plain = MultiScaleRoIAlign(featmap_names=LEVELS, output_size=(7, 5), sampling_ratio=sampling, canonical_scale=112,
                               canonical_level=3)
    fast = fast_pooler(plain)
    assert type(fast) is kind and fast is not plain and type(plain) is MultiScaleRoIAlign
    for key in ("featmap_names", "output_size", "sampling_ratio", "canonical_scale", "canonical_level"):
        assert getattr(fast, key) == getattr(plain, key), key
    features, boxes, shapes = _features(), _boxes_over_the_border((30, 12)), [(256, 192), (256, 192)]
    with torch.inference_mode():
        torch.testing.assert_close(fast(features, boxes, shapes), plain(features, boxes, shapes), atol=1e-5, rtol=1e-5)


def test_filter_input_picks_the_named_maps_in_input_order():
    features = _features()
    assert [m.shape for m in filter_input(features, ["2", "0"])] == [features["0"].shape, features["2"].shape]
