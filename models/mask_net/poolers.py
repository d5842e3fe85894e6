"""Multi-scale RoIAlign whose RoIs are shared out over the CPU threads at inference.

torchvision's CPU ``roi_align`` kernel runs on one thread, so on a 2-core machine the box and mask
poolers of ``maskrcnn_resnet50_fpn`` (1,000 proposals and 100 detections per slice) leave a core
idle for about a tenth of the slice's time. Each RoI is pooled on its own (its level depends on its
size alone), so splitting the RoIs into consecutive runs, pooling the runs on separate threads (the
kernel releases the GIL) and concatenating gives exactly the same tensor.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _filter_input, _setup_scales

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


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
        if threads < 2:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:  # set once, before any thread reads them
            self.scales, self.map_levels = _setup_scales(_filter_input(x, self.featmap_names), image_shapes,
                                                         self.canonical_scale, self.canonical_level)
        inference = torch.is_inference_mode_enabled()

        def pool(part: list[Tensor]) -> Tensor:
            # Grad and inference modes are per thread: the worker takes the caller's.
            with torch.inference_mode() if inference else torch.no_grad():
                return MultiScaleRoIAlign.forward(self, x, part, image_shapes)

        return torch.cat(list(_pool(threads).map(pool, split_boxes(boxes, threads))))

    def _threads(self, x: dict[str, Tensor], boxes: list[Tensor]) -> int:
        """How many threads to split over: 1 when the parent should run as it is."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*x.values(), *boxes))
        if needs_grad or any(t.device.type != "cpu" for t in x.values()):
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
