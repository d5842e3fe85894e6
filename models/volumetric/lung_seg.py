"""Task ``lung_seg``: lung segmentation of chest CT with MONAI's AH-Net.

Pre-processing: orientation RAS, resample to 0.8 x 0.8 x 5 mm, clip to [-1500, 500] HU and scale to
[0, 1]. Training: 224 x 224 x 32 random crops (short scans padded), soft Dice loss. Inference:
sliding window with Gaussian blending. Post-processing: keep the two largest connected components
(the two lungs). Both lungs (label values 1 and 2) are one foreground class. The decoder up-samples
trilinearly: with AH-Net's stride-2 transposed convolutions, training from scratch stalled on some
phantom seeds in a checkerboard of alternating voxels. AH-Net's encoder can start from a
torchvision ResNet50 (``pretrained_2d``). The task has a MONAI bundle.
"""
from __future__ import annotations

from pathlib import Path

import torch
from monai.losses import DiceLoss
from monai.networks.nets import AHNet
from monai.transforms import KeepLargestConnectedComponent, RandSpatialCropd, SpatialPadd

from models.volumetric.bundle.segmentation import segmentation_bundle
from models.volumetric.common import IMAGE_KEY, LABEL_KEY
from models.volumetric.config import SegConfig
from models.volumetric.segmentation import seg_preprocessing
from models.volumetric.task import Task

# AH-Net down-samples every axis 32 times; psp_block_num > 2 fails at a 224 x 224 x 32 ROI.
MAX_PSP_BLOCKS = 2
ROI_MULTIPLE = 32
UPSAMPLE_MODES = ("transpose", "trilinear", "nearest")


def build_network(*, in_channels: int = 1, out_channels: int = 2, psp_block_num: int = 2,
                  upsample_mode: str = "trilinear") -> AHNet:
    """MONAI 3D AH-Net (ResNet50-like encoder with 3x3x1 kernels, dense decoder, PSP head).

    Args:
        in_channels: image channels (1 for CT).
        out_channels: classes including background (logits Float[B, out_channels, X, Y, Z]).
        psp_block_num: pyramid pooling blocks, 0 to 2.
        upsample_mode: ``trilinear`` (default), ``transpose`` (MONAI's default; stride-2 transposed
            convolutions, which can leave a checkerboard in the mask) or ``nearest``.

    Raises:
        ValueError: for an unsupported value, naming it.
    """
    if not 0 <= psp_block_num <= MAX_PSP_BLOCKS:
        raise ValueError(f"psp_block_num must be 0..{MAX_PSP_BLOCKS} (larger values fail at a "
                         f"224x224x32 ROI), got {psp_block_num}")
    if upsample_mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}")
    if in_channels < 1 or out_channels < 2:
        raise ValueError(f"need in_channels >= 1 and out_channels >= 2, got {in_channels}, {out_channels}")
    return AHNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                 psp_block_num=psp_block_num, upsample_mode=upsample_mode, pretrained=False)


def transfer_from_resnet50(model: AHNet, state_dict_path: str | Path) -> AHNet:
    """Initialise AH-Net's encoder from a local torchvision ResNet50 state dict (2D -> 3D).

    ``AHNet.copy_from`` reads ``conv1``, ``bn0`` and ``layer1``..``layer4`` of a 2D network (MONAI's
    ``FCN`` layout, where ``bn0`` is ResNet's ``bn1``); the ResNet50 built here with
    ``weights=None`` is loaded from the file and its stem and layers are handed over in that layout.
    Nothing is downloaded.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not a ResNet50 state dict.
    """
    import torchvision

    path = Path(state_dict_path)
    if not path.is_file():
        raise FileNotFoundError(f"ResNet50 state dict not found: {path}")
    resnet = torchvision.models.resnet50(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        resnet.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    except Exception as err:
        raise ValueError(f"{path}: not a torchvision ResNet50 state dict ({err})") from err
    encoder_2d = torch.nn.Module()
    encoder_2d.conv1, encoder_2d.bn0 = resnet.conv1, resnet.bn1
    for name in ("layer1", "layer2", "layer3", "layer4"):
        setattr(encoder_2d, name, getattr(resnet, name))
    model.copy_from(encoder_2d)
    return model


def augmentation(config: SegConfig) -> list:
    """Training crops: pad short scans to the ROI, then one random ROI-sized crop."""
    keys = (IMAGE_KEY, LABEL_KEY)
    return [SpatialPadd(keys, spatial_size=config.roi_size),
            RandSpatialCropd(keys, roi_size=config.roi_size, random_size=False)]


def loss() -> torch.nn.Module:
    """Soft Dice loss on softmax probabilities against one-hot labels."""
    return DiceLoss(to_onehot_y=True, softmax=True)


def postprocessing(config: SegConfig) -> KeepLargestConnectedComponent:
    """Keep the two largest lung components of a label map Int[1, X, Y, Z]."""
    return KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, num_components=2)


def bundle_postprocessing(config: SegConfig) -> list[dict]:
    """:func:`postprocessing` as a MONAI bundle transform on ``pred``."""
    post = postprocessing(config)
    return [{"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": list(post.applied_labels),
             "is_onehot": post.is_onehot, "independent": post.independent, "connectivity": post.connectivity,
             "num_components": post.num_components}]


BUNDLE = segmentation_bundle(
    network="AHNet",
    fixed_args={"spatial_dims": 3, "pretrained": False},
    task_text="Lung segmentation of chest CT",
    purpose="segments both lungs (one foreground class)",
    reference="Liu S. et al. 3D Anisotropic Hybrid Network: Transferring Convolutional Features from 2D "
              "Images to 3D Anisotropic Volumes. MICCAI 2018. https://arxiv.org/abs/1711.08580",
    postprocessing=bundle_postprocessing,
    post_text="Post-processing: argmax, then the two largest connected lung components are kept.",
    packages=("scikit-image",),
)

TASK = Task(
    name="lung_seg",
    kind="segmentation",
    builder="models.volumetric.lung_seg.build_network",
    network_kwargs={"in_channels": 1, "out_channels": 2, "psp_block_num": 2, "upsample_mode": "trilinear"},
    default_config=SegConfig(spacing=(0.8, 0.8, 5.0), roi_size=(224, 224, 32), hu_window=(-1500.0, 500.0)),
    roi_multiple=ROI_MULTIPLE,
    preprocessing=seg_preprocessing,
    augmentation=augmentation,
    loss=loss,
    postprocessing=postprocessing,
    default_lr=1e-4,
    class_names=("background", "lung"),
    pretrained={"pretrained_2d": transfer_from_resnet50},
    bundle=BUNDLE,
)
