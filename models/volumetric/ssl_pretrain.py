"""Task ``ssl_pretrain``: self-supervised pre-training of MONAI's ViTAutoEnc on unlabelled volumes.

As in MONAI's self-supervised tutorial: each volume is resampled to 2 mm, windowed to
[-1000, 1000] HU, cropped to the body and to a random 96^3 ROI. The ROI is copied three times: the
reconstruction target ``gt_image`` and two views ``image`` and ``image_2``, each augmented on its
own by one of inner cutout (holes dropped, ``RandCoarseDropoutd(dropout_holes=True)``) or outer
cutout (everything but the holes dropped, ``dropout_holes=False``), then local patch shuffling
(``RandCoarseShuffled``). Hole sizes scale with the ROI (the tutorial's at 96^3).

Loss: L1 reconstruction of ``gt_image`` from the first view plus a contrastive term (MONAI's
``ContrastiveLoss``, temperature 0.05) between the two views' flattened reconstructions, weighted
by the L1 term as in the tutorial: ``total = l1 + l1 * contrastive``. The contrastive term needs a
batch of at least two volumes (each view's negatives are the other volumes); with one it is zero.

The ViT's patch size is 16 (ViTAutoEnc up-samples by 4 x 4 and UNETR expects 16), and its 12 layers
are what UNETR reads (``organ_seg``), so the encoder transfers key for key.
"""
from __future__ import annotations

from typing import Sequence

import torch
from monai.data import DataLoader, Dataset
from monai.losses import ContrastiveLoss
from monai.networks.nets import ViTAutoEnc
from monai.transforms import (
    Compose,
    CopyItemsd,
    CropForegroundd,
    OneOf,
    Orientationd,
    RandCoarseDropoutd,
    RandCoarseShuffled,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)
from tqdm import tqdm

from models.volumetric.common import IMAGE_KEY, LoadVolumed
from models.volumetric.config import SegConfig
from models.volumetric.task import Task
from models.volumetric.vit import PATCH_SIZE, check_vit_sizes, img_size_from_roi
from utils.amp import autocast
from utils.training import backward_step

VIEW_KEYS = (IMAGE_KEY, "image_2")
TARGET_KEY = "gt_image"
TEMPERATURE = 0.05
TUTORIAL_ROI = 96  # hole sizes below are the tutorial's at this ROI side


def build_network(*, img_size: Sequence[int] = (96, 96, 96), in_channels: int = 1, hidden_size: int = 768,
                  mlp_dim: int = 3072, num_layers: int = 12, num_heads: int = 12,
                  dropout_rate: float = 0.0) -> ViTAutoEnc:
    """MONAI ViTAutoEnc with 16^3 patches and a convolutional patch embedding.

    Args:
        img_size: ROI (x, y, z), each a multiple of 16; the reconstruction has this size.
        in_channels: image channels (1 for CT).
        hidden_size: token width; a multiple of ``num_heads``.
        mlp_dim: width of each block's MLP.
        num_layers: transformer blocks; UNETR (``organ_seg``) reads 12.
        num_heads: attention heads.
        dropout_rate: dropout in the blocks, in [0, 1).

    Returns:
        A module mapping Float[B, C, *img_size] to (reconstruction Float[B, C, *img_size],
        hidden states: ``num_layers`` tensors Float[B, tokens, hidden_size]).

    Raises:
        ValueError: for sizes the ViT cannot take, naming them.
    """
    img_size = check_vit_sizes(img_size, hidden_size=hidden_size, num_heads=num_heads, mlp_dim=mlp_dim,
                                dropout_rate=dropout_rate)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return ViTAutoEnc(in_channels=in_channels, out_channels=in_channels, img_size=img_size, patch_size=PATCH_SIZE,
                      hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
                      proj_type="conv", dropout_rate=dropout_rate, spatial_dims=3)


def preprocessing(config: SegConfig, *, keys: Sequence[str] = (IMAGE_KEY,)) -> list:
    """Load, orient, resample, window to [0, 1] and crop to the body; only ``image`` is read.

    Args:
        config: spacing, window and orientation.
        keys: ignored apart from ``image``: pre-training uses no labels.

    Returns:
        Dictionary transforms; ``image`` ends as Float[1, X, Y, Z] in [0, 1].
    """
    low, high = config.hu_window
    return [
        SelectItemsd((IMAGE_KEY, "case"), allow_missing_keys=True),  # labels of a datalist are not read
        LoadVolumed((IMAGE_KEY,), strict_hu=config.strict_hu),
        Orientationd(IMAGE_KEY, axcodes=config.orientation, labels=None),
        Spacingd(IMAGE_KEY, pixdim=config.spacing, mode="bilinear"),
        ScaleIntensityRanged(IMAGE_KEY, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(IMAGE_KEY, source_key=IMAGE_KEY, allow_smaller=True),
    ]


def augmentation(config: SegConfig) -> list:
    """Random ROI, copies into target and two views, then cutout and patch shuffling per view."""
    return [
        SpatialPadd(IMAGE_KEY, spatial_size=config.roi_size),
        RandSpatialCropd(IMAGE_KEY, roi_size=config.roi_size, random_size=False),
        CopyItemsd(IMAGE_KEY, times=2, names=[TARGET_KEY, VIEW_KEYS[1]]),
        *view_augmentation(VIEW_KEYS[0], config.roi_size),
        *view_augmentation(VIEW_KEYS[1], config.roi_size),
    ]


def view_augmentation(key: str, roi_size: Sequence[int]) -> list:
    """One view's transforms: inner or outer cutout (one of them), then local patch shuffling.

    Separate instances per view, so the two views draw their holes independently.
    """
    scale = min(roi_size) / TUTORIAL_ROI

    def size(voxels: int) -> int:
        return max(1, round(voxels * scale))

    cutout = OneOf([
        RandCoarseDropoutd(key, prob=1.0, holes=6, spatial_size=size(5), max_spatial_size=size(32), dropout_holes=True),
        RandCoarseDropoutd(key, prob=1.0, holes=6, spatial_size=size(20), max_spatial_size=size(64),
                           dropout_holes=False),
    ])
    return [cutout, RandCoarseShuffled(key, prob=0.8, holes=10, spatial_size=max(2, size(8)))]


class SSLLoss(torch.nn.Module):
    """L1 reconstruction plus reconstruction-weighted contrastive loss between two views.

    ``forward(recon_1, recon_2, target)`` takes Float[B, C, X, Y, Z] each and returns a dict of
    scalars: ``loss`` (the total to minimise), ``l1`` and ``contrastive``.
    """

    def __init__(self, temperature: float = TEMPERATURE):
        super().__init__()
        self.l1 = torch.nn.L1Loss()
        self.contrastive = ContrastiveLoss(temperature=temperature)

    def forward(self, recon_1: torch.Tensor, recon_2: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        l1 = self.l1(recon_1, target)
        contrastive = self.contrastive(recon_1.flatten(start_dim=1), recon_2.flatten(start_dim=1))  # [B, C*X*Y*Z]
        return {"loss": l1 + l1 * contrastive, "l1": l1, "contrastive": contrastive}


def loss() -> torch.nn.Module:
    """The :class:`SSLLoss` of the tutorial (temperature 0.05)."""
    return SSLLoss()


def postprocessing(config: SegConfig):
    """Reconstructions are used as they are."""
    return lambda reconstruction: reconstruction


def ssl_losses(model: torch.nn.Module, batch: dict, *, loss_fn: torch.nn.Module,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Reconstruct both views of a batch and score them.

    Args:
        batch: ``image``, ``image_2`` and ``gt_image``, Float[B, 1, X, Y, Z] each.

    Returns:
        ``loss``, ``l1`` and ``contrastive`` scalars (see :class:`SSLLoss`).
    """
    view_1, view_2 = (batch[k].to(device) for k in VIEW_KEYS)
    recon_1, _ = model(view_1)
    recon_2, _ = model(view_2)
    return loss_fn(recon_1, recon_2, batch[TARGET_KEY].to(device))


def train_one_epoch(model: torch.nn.Module, loader, *, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
                    device: torch.device, scaler: torch.amp.GradScaler | None = None, amp: bool = False,
                    progress: bool = False, desc: str = "train") -> dict[str, float]:
    """One pass over ``loader``; returns the mean ``loss``, ``l1`` and ``contrastive`` terms.

    Raises:
        FloatingPointError: when the loss is not finite.
    """
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            losses = ssl_losses(model, batch, loss_fn=loss_fn, device=device)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"{desc}: loss is {losses['loss'].item()} at step {steps}")
        backward_step(losses["loss"], optimizer, scaler)
        sums = {k: sums.get(k, 0.0) + float(v.detach()) for k, v in losses.items()}
        steps += 1
    return {k: v / max(steps, 1) for k, v in sums.items()}


def evaluate(model: torch.nn.Module, dataset, *, config: SegConfig, device: torch.device, seed: int = 0,
             batch_size: int = 2, **_: object) -> dict[str, float]:
    """Mean losses on pre-processed validation volumes, with views drawn from a fixed seed.

    The same seed every call keeps the validation loss comparable between epochs. Returns
    ``loss``, ``l1``, ``contrastive``.
    """
    views = Compose(augmentation(config)).set_random_state(seed=seed)
    items = [views(dict(dataset[i])) for i in range(len(dataset))]
    model.eval()
    sums: dict[str, float] = {}
    batches = 0
    with torch.inference_mode():
        for batch in DataLoader(Dataset(items), batch_size=batch_size):
            losses = ssl_losses(model, batch, loss_fn=loss(), device=device)
            sums = {k: sums.get(k, 0.0) + float(v.detach()) for k, v in losses.items()}
            batches += 1
    return {k: v / max(batches, 1) for k, v in sums.items()}


def validate_cases(cases: list[dict], **_: object) -> tuple[list[dict], dict]:
    """Pre-training has no ground truth to validate against.

    Raises:
        ValueError: always; the validation losses are in the run's metrics.jsonl.
    """
    raise ValueError("ssl_pretrain has no labels to validate against; its validation losses (loss, l1, "
                     "contrastive) are logged per epoch in the run's metrics.jsonl")


TASK = Task(
    name="ssl_pretrain",
    kind="self_supervised",
    builder="models.volumetric.ssl_pretrain.build_network",
    network_kwargs={"img_size": [96, 96, 96], "in_channels": 1, "hidden_size": 768, "mlp_dim": 3072,
                    "num_layers": 12, "num_heads": 12},
    default_config=SegConfig(spacing=(2.0, 2.0, 2.0), roi_size=(96, 96, 96), hu_window=(-1000.0, 1000.0)),
    roi_multiple=PATCH_SIZE,
    preprocessing=preprocessing,
    augmentation=augmentation,
    loss=loss,
    postprocessing=postprocessing,
    default_lr=1e-4,
    class_names=("image",),
    train_one_epoch=train_one_epoch,
    evaluate=evaluate,
    selection_metric=("loss", False),  # validation loss selects checkpoint_best.pth (lower is better)
    validate_cases=validate_cases,
    infer_cases=None,
    network_for_config=img_size_from_roi,
)
