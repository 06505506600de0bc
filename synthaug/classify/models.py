"""Classifiers: any timm model by name, plus tiny CNNs registered *with timm* for 8x8 inputs.

timm's smallest models downsample by 32, which leaves nothing of an 8x8 digit, so
synthaug registers ``synthaug_cnn_tiny`` / ``synthaug_cnn_small`` in timm's own registry
(``timm.create_model`` builds them like any other model) rather than keeping a second
registry. Saved classifiers are a directory with ``model.safetensors`` and
``classifier.json``; loading never unpickles.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import timm
import torch
from torch import nn
from timm.models import register_model
from safetensors.torch import load_file, save_file

from synthaug.artifacts import atomic_write_json, commit_dir, staging_dir


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


def check_model_name(name: str) -> None:
    """Raise a clear error, with close names, for a model timm does not know."""
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"config key 'classify.model': unknown timm model {name!r}{hint}")


def create_classifier(name: str, num_classes: int, in_chans: int, pretrained_path: str = "") -> nn.Module:
    """A timm model by name; ``pretrained_path`` is a local weights file (never a download)."""
    check_model_name(name)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if pretrained_path:
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_path)}
    return timm.create_model(name, **kwargs)


def save_classifier(model: nn.Module, path: str | Path, meta: dict) -> Path:
    """Write weights (safetensors) and ``classifier.json`` atomically."""
    tmp = staging_dir(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    atomic_write_json(tmp / "classifier.json", meta)
    return commit_dir(tmp, path)


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a saved classifier (eval mode) and return it with its metadata."""
    path = Path(path)
    meta_file = path / "classifier.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a saved classifier (no classifier.json)")
    meta = json.loads(meta_file.read_text())
    model = create_classifier(meta["model"], meta["num_classes"], meta["in_chans"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), meta
