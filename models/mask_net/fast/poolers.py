"""Multi-scale RoIAlign for CPU inference: RoIs shared out over threads, or pooled as row gathers.

The readable model pools with torchvision's ``MultiScaleRoIAlign``; the fast copy swaps in these
(:func:`fast_pooler`), with the same arguments and results.

torchvision's CPU ``roi_align`` kernel runs on one thread, so with many RoIs the poolers leave the
other cores idle. Each RoI is pooled on its own (its level depends on its size alone), so splitting
the RoIs into consecutive runs, pooling the runs on separate threads (the kernel releases the GIL)
and concatenating gives exactly the same tensor (:class:`ParallelMultiScaleRoIAlign`).

:class:`GatherMultiScaleRoIAlign` goes further for inference. The kernel reads NCHW maps, so each
bilinear sample strides across every channel plane. Here the levels are laid out once as the rows
of one channels-last table (pixel -> C values, :class:`LevelRows`), and every output bin is a
weighted sum of the table rows under its samples: ``grid^2`` samples times 4 corners, computed for
all RoIs at once and summed by one ``embedding_bag``. Same results to float rounding; measured
speed-ups are in benchmarks/README.md.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign

from . import kernels

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def cpu_inference(maps: list[Tensor], boxes: list[Tensor]) -> bool:
    """No gradient is needed and the maps are on CPU: when the threaded and gather paths apply."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*maps, *boxes))
    return not needs_grad and all(m.device.type == "cpu" for m in maps)


def filter_input(x: dict[str, Tensor], featmap_names: list[str]) -> list[Tensor]:
    """The maps of ``x`` named in ``featmap_names``, in the order of ``x`` (as torchvision's pooler picks them)."""
    return [v for k, v in x.items() if k in featmap_names]


def use_gather_poolers(roi_heads) -> None:
    """Switch, in place, the torchvision ``MultiScaleRoIAlign`` poolers of ``roi_heads`` (a
    :class:`~models.mask_net.roi_heads.RoIHeads`) to :func:`fast_pooler` copies, for training on CPU.

    Poolers hold no parameters, so the state dict and checkpoints do not change; the pooled features
    and their gradients equal torchvision's to float rounding (tested). Without torchvision's scale
    helper (:mod:`.kernels`) the poolers stay as they are.
    """
    if not kernels.pooler_scales_usable():
        return
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(roi_heads, name, None)
        if type(pool) is MultiScaleRoIAlign:
            setattr(roi_heads, name, fast_pooler(pool))


def fast_pooler(pool: MultiScaleRoIAlign) -> MultiScaleRoIAlign:
    """A new :class:`GatherMultiScaleRoIAlign` with the settings of ``pool`` (a :class:`ParallelMultiScaleRoIAlign`
    for an adaptive ``sampling_ratio``, which the gather form does not cover)."""
    cls = GatherMultiScaleRoIAlign if pool.sampling_ratio > 0 else ParallelMultiScaleRoIAlign
    return cls(featmap_names=list(pool.featmap_names), output_size=pool.output_size, sampling_ratio=pool.sampling_ratio,
               canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)


class ParallelMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``torchvision.ops.MultiScaleRoIAlign`` with the RoIs split over ``torch.get_num_threads()`` threads.

    Same arguments, buffers and results as the parent. The split is used on CPU when no gradient is
    needed and there are at least ``min_rois_per_thread`` RoIs per thread; otherwise the parent runs.
    """

    min_rois_per_thread = 32

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Args: x: level name -> Float[B, C, H_l, W_l]; boxes: per image Float[N_i, 4] xyxy in image
        coordinates; image_shapes: per image (H, W). Returns: Float[sum N_i, C, S, S], RoIs in order."""
        threads = self._threads(x, boxes)
        # The scales are set once, before any thread reads them.
        if threads < 2 or not self._set_scales(filter_input(x, self.featmap_names), image_shapes):
            return super().forward(x, boxes, image_shapes)
        inference = torch.is_inference_mode_enabled()

        def pool(part: list[Tensor]) -> Tensor:
            # Grad and inference modes are per thread: the worker takes the caller's.
            with torch.inference_mode() if inference else torch.no_grad():
                return MultiScaleRoIAlign.forward(self, x, part, image_shapes)

        return torch.cat(list(_pool(threads).map(pool, split_boxes(boxes, threads))))

    def _set_scales(self, maps: list[Tensor], image_shapes: list[tuple[int, int]]) -> bool:
        """Set torchvision's ``scales`` and ``map_levels`` unless set; False where they cannot be set here."""
        if self.scales is None or self.map_levels is None:
            geometry = kernels.pooler_scales(maps, image_shapes, self.canonical_scale, self.canonical_level)
            if geometry is None:
                return False
            self.scales, self.map_levels = geometry
        return True

    def _threads(self, x: dict[str, Tensor], boxes: list[Tensor]) -> int:
        """How many threads to split over: 1 when the parent should run as it is."""
        if not cpu_inference(list(x.values()), boxes):
            return 1
        total = sum(int(b.shape[0]) for b in boxes)
        return max(1, min(torch.get_num_threads(), total // self.min_rois_per_thread))


def split_boxes(boxes: list[Tensor], parts: int) -> list[list[Tensor]]:
    """Cut the RoIs, in order over all images, into ``parts`` consecutive runs of near-equal length.

    Args:
        boxes: per image Float[N_i, 4].
        parts: number of runs.

    Returns:
        ``parts`` lists of per-image tensors (empty where an image has no RoI in the run); pooling
        each run and concatenating the results in order gives the rows of pooling all RoIs at once.
    """
    total = sum(int(b.shape[0]) for b in boxes)
    bounds = [total * k // parts for k in range(parts + 1)]
    runs = []
    for lo, hi in zip(bounds, bounds[1:]):
        run, start = [], 0
        for b in boxes:
            n = int(b.shape[0])
            run.append(b[min(max(lo - start, 0), n):min(max(hi - start, 0), n)])
            start += n
        runs.append(run)
    return runs


def _pool(threads: int) -> ThreadPoolExecutor:
    """One executor per process and size (a forked child builds its own: threads do not survive fork)."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="roi_align")
    return _POOLS[key]


class LevelRows(dict):
    """Feature maps (name -> Float[B, C, H_l, W_l], as given) plus one table holding every pixel of
    every map as a row: ``table`` Float[sum_l B * H_l * W_l, C] and ``start[name]``, the first row of
    that map; pixel (b, y, x) of map ``name`` is row ``start[name] + (b * H_l + y) * W_l + x``.
    All maps must share C, dtype and device. Poolers that cannot use the table read the maps."""

    def __init__(self, maps: dict[str, Tensor]) -> None:
        super().__init__(maps)
        first = next(iter(maps.values()))
        total = sum(m.shape[0] * m.shape[2] * m.shape[3] for m in maps.values())
        self.table = first.new_empty((total, first.shape[1]))
        self.start, row = {}, 0
        for name, m in maps.items():
            b, c, h, w = m.shape
            self.table[row:row + b * h * w].view(b, h, w, c).copy_(m.permute(0, 2, 3, 1))
            self.start[name], row = row, row + b * h * w


class GatherMultiScaleRoIAlign(ParallelMultiScaleRoIAlign):
    """Multi-scale RoIAlign (``aligned=False``, as torchvision's) as row gathers from :class:`LevelRows`.

    Same arguments and results as ``MultiScaleRoIAlign``; the result has channels-last strides.
    ``x`` may be a plain dict (its table is built here) or :class:`LevelRows` shared by several
    poolers. Off CPU, with an adaptive ``sampling_ratio`` or without torchvision's scale helper the
    parent runs.

    Gradients flow to the maps (the table is built from them by differentiable copies, and
    ``embedding_bag``'s backward adds each bin's gradient to the rows under its samples), so the
    pooler also trains: torchvision's CPU ``roi_align`` backward runs on one thread and took about
    half of a training step (see :func:`use_gather_poolers`).
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Args: x: level name -> Float[B, C, H_l, W_l]; boxes: per image Float[N_i, 4] xyxy in image
        coordinates; image_shapes: per image (H, W). Returns: Float[sum N_i, C, S, S], RoIs in order."""
        maps = filter_input(x, self.featmap_names)
        num_rois = sum(len(b) for b in boxes)
        if (self.sampling_ratio <= 0 or not num_rois or any(m.device.type != "cpu" for m in maps)
                or any(b.requires_grad for b in boxes) or not self._set_scales(maps, image_shapes)):
            return super().forward(x, boxes, image_shapes)
        rows = x if isinstance(x, LevelRows) else LevelRows({name: x[name] for name in self.featmap_names})
        levels = self.map_levels(boxes) if len(maps) > 1 else torch.zeros(num_rois, dtype=torch.int64)
        index, weight = bin_samples(boxes, levels, self._level_geometry(maps, rows), self.output_size,
                                    self.sampling_ratio)
        pooled = F.embedding_bag(index, rows.table, per_sample_weights=weight.to(rows.table.dtype), mode="sum")
        s0, s1 = self.output_size
        return pooled.view(-1, s0, s1, rows.table.shape[1]).permute(0, 3, 1, 2)

    def _level_geometry(self, maps: list[Tensor], rows: LevelRows) -> Tensor:
        """Float64[L, 4]: per level (scale, H, W, first table row)."""
        return torch.tensor([(scale, m.shape[2], m.shape[3], rows.start[name])
                             for scale, m, name in zip(self.scales, maps, self.featmap_names)], dtype=torch.float64)


def bin_samples(boxes: list[Tensor], levels: Tensor, geometry: Tensor, output_size: tuple[int, int],
                grid: int) -> tuple[Tensor, Tensor]:
    """Table rows and weights whose sums are RoIAlign's output bins (torchvision's CPU kernel, aligned=False).

    Each bin averages ``grid x grid`` bilinear samples; a sample more than one pixel outside the map
    counts zero, one within a pixel of the border is clamped to it. The sampling is separable: per
    axis a bin has ``grid`` samples of 2 corners, and a (y, x) pair's weight is the product.

    Args:
        boxes: per image Float[N_i, 4] xyxy in image coordinates.
        levels: Int64[R] level of each RoI (R = sum N_i).
        geometry: Float64[L, 4] per level (scale, H, W, first table row) from :class:`LevelRows`.
        output_size: (S0, S1) bins.
        grid: samples per bin and axis (the pooler's ``sampling_ratio``).

    Returns:
        ``index`` Int64[R * S0 * S1, 4 * grid^2] table rows and ``weight`` Float[R * S0 * S1, 4 * grid^2].
    """
    batch = torch.cat([torch.full((len(b),), i, dtype=torch.int64) for i, b in enumerate(boxes)])
    rois = torch.cat(boxes)
    scale, height, width, start = geometry[levels].unbind(1)
    x1, y1, x2, y2 = (rois * scale.to(rois.dtype)[:, None]).unbind(1)
    height, width = height.long(), width.long()
    ys, wy = _axis_samples(y1, (y2 - y1).clamp(min=1.0), output_size[0], grid, height)
    xs, wx = _axis_samples(x1, (x2 - x1).clamp(min=1.0), output_size[1], grid, width)
    base = start.long() + batch * height * width  # (R,)
    # (R, S0, S1, [y sample, corner], [x sample, corner])
    index = (base[:, None, None, None, None] + ys.flatten(2)[:, :, None, :, None] * width[:, None, None, None, None]
             + xs.flatten(2)[:, None, :, None, :])
    weight = wy.flatten(2)[:, :, None, :, None] * wx.flatten(2)[:, None, :, None, :] / (grid * grid)
    bins = rois.shape[0] * output_size[0] * output_size[1]
    return index.reshape(bins, -1), weight.reshape(bins, -1)


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: int, size: Tensor) -> tuple[Tensor, Tensor]:
    """Per RoI, bin and sample along one axis: the two neighbouring pixels and their weights.

    Args:
        start, length: Float[R] RoI start and length in map pixels; size: Int64[R] map size on this axis.

    Returns:
        Int64[R, bins, grid, 2] pixels and Float[R, bins, grid, 2] weights (zero outside the map).
    """
    step = length / bins
    offsets = torch.arange(bins, dtype=start.dtype)[:, None] * step[:, None, None]  # (R, bins, 1)
    within = (torch.arange(grid, dtype=start.dtype) + 0.5) * step[:, None, None] / grid  # (R, 1, grid)
    pos = start[:, None, None] + offsets + within  # (R, bins, grid), the kernel's order of operations
    size = size[:, None, None]
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low
    pixels = torch.stack((low, torch.where(at_edge, low, low + 1)), dim=-1)
    weights = torch.stack((1.0 - frac, frac), dim=-1) * inside[..., None]
    return pixels, weights
