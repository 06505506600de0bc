"""synthaug's tiny CNNs for 8-32 px inputs, registered *with timm* (a leaf module: torch and timm only).

timm's smallest models downsample by 32, which leaves nothing of an 8x8 digit, so
synthaug registers ``synthaug_cnn_tiny`` / ``synthaug_cnn_small`` in timm's own registry
(``timm.create_model`` builds them like any other model) rather than keeping a second
registry. Importing this module registers them.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


class TinyCNN(nn.Module):
    """Three 3x3 conv blocks and global pooling; timm-style feature/head split."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32, drop_rate: float = 0.1, **_):
        super().__init__()
        w = width

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.features = nn.Sequential(block(in_chans, w, False), block(w, 2 * w, True), block(2 * w, 4 * w, True))
        self.num_features = 4 * w
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, F, H/4, W/4)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, F)
        return x if pre_logits else self.head(self.drop(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def synthaug_cnn_tiny(pretrained: bool = False, **kwargs) -> TinyCNN:
    """~0.1M-parameter CNN for 8x8 grayscale digits."""
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    return TinyCNN(width=32, **kwargs)


@register_model
def synthaug_cnn_small(pretrained: bool = False, **kwargs) -> TinyCNN:
    """~0.4M-parameter variant."""
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    return TinyCNN(width=64, **kwargs)
