"""Separate BatchNorm statistics for synthetic images (off by default).

*Diversify, Don't Fine-Tune* (Marwood et al.) keeps the real images' normalisation
statistics clean by giving synthetic images their own BatchNorm. ``convert_domain_bn``
replaces every ``BatchNorm2d`` of a model by a ``DomainBatchNorm2d`` holding two copies
(both start from the original, so pretrained statistics carry over). ``set_domain`` tells
all of them which samples of the next forward pass are synthetic; with no domain set
(evaluation on real images, exported models) the real branch is used.
"""

from __future__ import annotations

import copy

import torch

from synthaug.errors import InputValueError
from torch import nn


class DomainBatchNorm2d(nn.Module):
    """Two BatchNorm2d, one per domain; a mixed batch is split, normalised per domain and re-joined."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.real = bn
        self.synthetic = copy.deepcopy(bn)
        self.domain: torch.Tensor | None = None  # (B,) bool, True = synthetic; None = all real

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        m = self.domain
        if m is None or not self.training or not bool(m.any()):
            return self.real(x)
        if bool(m.all()):
            return self.synthetic(x)
        m = m.to(x.device)
        out = torch.empty_like(x)
        out[~m] = self.real(x[~m])
        out[m] = self.synthetic(x[m])
        return out


def convert_domain_bn(model: nn.Module) -> nn.Module:
    """Replace each BatchNorm2d by a DomainBatchNorm2d in place; raises if the model has none."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, DomainBatchNorm2d(child))
                replaced += 1
    if replaced == 0:
        raise InputValueError("config key 'classify.domain_bn': the model has no BatchNorm2d layers to split by domain")
    return model


def set_domain(model: nn.Module, synthetic: torch.Tensor | None) -> None:
    """Mark which samples of the next forward pass are synthetic (None: all real)."""
    for module in model.modules():
        if isinstance(module, DomainBatchNorm2d):
            module.domain = synthetic


def has_domain_bn(model: nn.Module) -> bool:
    return any(isinstance(m, DomainBatchNorm2d) for m in model.modules())
