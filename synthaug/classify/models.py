"""Classifiers: any timm model by name, plus tiny CNNs registered *with timm* for 8x8 inputs.

timm's smallest models downsample by 32, which leaves nothing of an 8x8 digit, so
synthaug registers ``synthaug_cnn_tiny`` / ``synthaug_cnn_small`` in timm's own registry
(``timm.create_model`` builds them like any other model) rather than keeping a second
registry. Saved classifiers are a directory with ``model.safetensors`` and
``classifier.json``; loading never unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch import nn
from safetensors.torch import load_file, save_file

from synthaug.artifacts import atomic_write_json, publish_tree, staging_dir
from synthaug.classify.cnn import TinyCNN  # noqa: F401  (registers synthaug_cnn_tiny / _small with timm)
from synthaug.classify.model_names import check_classifier_config, check_model_name  # noqa: F401  (re-exported)
from synthaug.errors import InputNotFound, InputValueError


def create_classifier(name: str, num_classes: int, in_chans: int, pretrained_path: str = "") -> nn.Module:
    """A timm model by name; ``pretrained_path`` is a local weights file (never a download)."""
    check_model_name(name)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
    if pretrained_path:
        load_pretrained_local(model, pretrained_path)
    return model


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unrestricted pickle
    for key in ("state_dict", "model", "state_dict_ema"):  # timm / torchvision checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def _adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """First-conv weights for another input channel count: timm's rule, plus 1 -> C by even split."""
    from timm.models import adapt_input_conv

    if weight.shape[1] == 1:  # grayscale -> C channels: each gets 1/C, so a gray image gives the same response
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    return adapt_input_conv(in_chans, weight)


def load_pretrained_local(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state dict into ``model``, adapting what a new task changes.

    The classifier head is left at its fresh init when its shape differs (another class
    count); the first conv is adapted with timm's ``adapt_input_conv`` when only the input
    channels differ. Any other missing, unexpected or mis-shaped key is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"config key 'classify.pretrained_path': {path} is not a file")
    state = _read_weights(path)
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if head is not None and m is head)
    head_keys = {k for k in own if prefixes and k.startswith(prefixes)}
    out, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            raise InputValueError(f"{path}: key {key!r} is not in {type(model).__name__} (another architecture?)")
        want = own[key].shape
        if value.shape == want:
            out[key] = value
        elif key in head_keys:
            skipped.append(key)
        elif value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            out[key] = _adapt_input_conv(int(want[1]), value)
        else:
            raise InputValueError(f"{path}: key {key!r} has shape {tuple(value.shape)}, the model wants {tuple(want)}")
    missing = [k for k in own if k not in out and k not in skipped and k not in head_keys]
    if missing:
        raise InputValueError(f"{path}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(out, strict=False)
    return model


def build_classifier(cfg, num_classes: int, in_chans: int, seed: int) -> nn.Module:
    """The training model of a ClassifyConfig: seeded init, local weights, optional domain BatchNorm."""
    from synthaug.classify.domain import convert_domain_bn

    torch.manual_seed(seed)
    model = create_classifier(cfg.model, num_classes, in_chans, cfg.pretrained_path)
    return convert_domain_bn(model) if cfg.domain_bn else model


def save_classifier(model: nn.Module, location: str | Path, meta: dict) -> Path | str:
    """Write weights (safetensors) and ``classifier.json`` to ``location`` (local or URI) as one tree.

    Built in a local temp dir, then published (``artifacts.publish_tree``: renamed into
    place locally, uploaded with ``classifier.json`` on an object store). Returns the
    location (a ``Path`` when local).
    """
    import tempfile

    from synthaug import storage

    lp = storage.local_path(location)
    # Local: build next to the target, so publishing is one rename on one filesystem.
    tmp = staging_dir(lp) if lp is not None else Path(tempfile.mkdtemp(prefix=".classifier-"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    atomic_write_json(tmp / "classifier.json", meta)
    out = publish_tree(tmp, lp if lp is not None else location)
    return Path(out) if lp is not None else out


def load_classifier(location: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a saved classifier (eval mode) from a location (a local copy via ``storage.localize``)."""
    from synthaug import storage

    if not storage.is_file(storage.join(str(location), "classifier.json")):
        raise InputNotFound(f"{location}: not a saved classifier (no classifier.json)")
    path = storage.localize(str(location))
    meta = json.loads((path / "classifier.json").read_text())
    model = create_classifier(meta["model"], meta["num_classes"], meta["in_chans"])
    if meta.get("domain_bn"):
        from synthaug.classify.domain import convert_domain_bn

        convert_domain_bn(model)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), meta
