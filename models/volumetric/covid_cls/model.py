"""The classifier's network (MONAI's 3D DenseNet121 with one logit), loss and post-processing."""
from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121

from models.volumetric.covid_cls.config import ClsConfig


def build_network(*, in_channels: int = 1, out_channels: int = 1, init_features: int = 64,
                  growth_rate: int = 32, dropout_prob: float = 0.0) -> DenseNet121:
    """MONAI 3D DenseNet121 (blocks 6-12-24-16) giving ``out_channels`` logits.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: logits per case; 1 for the binary COVID-19 model (Float[B, 1]).
        init_features: channels of the stem; 64 in the standard network (smaller in tests).
        growth_rate: channels added per dense layer; 32 in the standard network.
        dropout_prob: dropout inside the dense layers.

    Raises:
        ValueError: for non-positive sizes or a dropout outside [0, 1).
    """
    if min(in_channels, out_channels, init_features, growth_rate) < 1:
        raise ValueError(f"in_channels, out_channels, init_features and growth_rate must be >= 1, got "
                         f"{in_channels}, {out_channels}, {init_features}, {growth_rate}")
    if not 0.0 <= dropout_prob < 1.0:
        raise ValueError(f"dropout_prob must lie in [0, 1), got {dropout_prob}")
    return DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                       init_features=init_features, growth_rate=growth_rate, dropout_prob=dropout_prob)


class BinaryLoss(torch.nn.BCEWithLogitsLoss):
    """BCE-with-logits on logits Float[B, 1] against labels Float[B] or Float[B, 1] in {0, 1}."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, labels.to(logits.dtype).view_as(logits))


def loss() -> torch.nn.Module:
    """BCE-with-logits (:class:`BinaryLoss`)."""
    return BinaryLoss()


def postprocessing(config: ClsConfig):
    """Logits Float[B, 1] -> COVID-19 probabilities Float[B]."""
    return lambda logits: torch.sigmoid(logits.float()).flatten()
