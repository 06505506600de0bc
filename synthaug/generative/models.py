"""Generator registry: one name-keyed family per model kind, loaded from local directories.

A *generator directory* is diffusers ``save_pretrained`` layout plus our manifest::

    <generator>/
      unet/                 config.json + diffusion_pytorch_model.safetensors
      scheduler/            scheduler_config.json (the training noise schedule)
      manifest.json         family, class_names, null_class, image size, hashes, config

``load_generator`` also accepts a plain diffusers directory (no manifest) as a *base*
to fine-tune from; exported generators always carry the manifest, and the sampler
refuses a directory without one. Nothing is downloaded unless ``allow_downloads``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from synthaug.artifacts import SCHEMA_VERSION, atomic_write_json, commit_dir, hash_tree, read_manifest, staging_dir

ARCHS = {
    # name: (block_out_channels, layers_per_block, norm groups)
    "tiny": ((32, 64), 1, 16),
    "small": ((64, 128), 2, 16),
}


class GeneratorError(ValueError):
    """A generator directory or family is wrong; the message names it."""


@dataclass
class Generator:
    """A loaded generator: the denoiser, its training noise schedule and its manifest."""

    family: str
    model: nn.Module
    scheduler_config: dict
    class_names: list[str]
    image_size: int
    channels: int
    manifest: dict = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return len(self.class_names)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Model output (eps or v) for noisy ``x`` (B, C, H, W), timesteps (B,), labels (B,)."""
        return FAMILIES[self.family].denoise(self.model, x, t, labels)


@dataclass(frozen=True)
class Family:
    """How to build, load, call and save one kind of generator."""

    name: str
    build: Callable[..., nn.Module]
    load_model: Callable[[Path, int], nn.Module]
    denoise: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    model_subdir: str


FAMILIES: dict[str, Family] = {}


def register_family(fam: Family) -> Family:
    if fam.name in FAMILIES:
        raise KeyError(f"generator family {fam.name!r} registered twice")
    FAMILIES[fam.name] = fam
    return fam


# ----------------------------------------------------------------------------- UNet family


def _unet_build(arch: str, image_size: int, channels: int, num_classes: int) -> nn.Module:
    from diffusers import UNet2DModel

    if arch not in ARCHS:
        raise GeneratorError(f"config key 'arch': unknown UNet preset {arch!r}; choose from {sorted(ARCHS)}")
    blocks, layers, groups = ARCHS[arch]
    if image_size % 2 ** (len(blocks) - 1):
        raise GeneratorError(f"image size {image_size} is not divisible by {2 ** (len(blocks) - 1)} for UNet preset {arch!r}")
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        layers_per_block=layers, block_out_channels=blocks, norm_num_groups=groups,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_classes + 1,  # + the null class, for classifier-free guidance
    )


def _resize_class_embedding(model: nn.Module, num_classes: int) -> None:
    """Give a UNet ``num_classes + 1`` class embeddings; new rows start from the old null row."""
    emb = model.class_embedding
    want = num_classes + 1
    if emb is None:
        raise GeneratorError("base UNet has no class embedding (num_class_embeds unset); it cannot be class-conditioned")
    if emb.num_embeddings == want:
        return
    new = nn.Embedding(want, emb.embedding_dim)
    with torch.no_grad():
        null_row = emb.weight[-1]
        new.weight.copy_(null_row.expand(want, -1))
        keep = min(want - 1, emb.num_embeddings - 1)
        new.weight[:keep] = emb.weight[:keep]
    model.class_embedding = new
    model.register_to_config(num_class_embeds=want)


def _unet_load(model_dir: Path, num_classes: int) -> nn.Module:
    from diffusers import UNet2DModel

    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("_class_name") != "UNet2DModel":
        raise GeneratorError(f"{model_dir}: holds a {cfg.get('_class_name')!r}, but family 'unet' needs a UNet2DModel")
    model = UNet2DModel.from_pretrained(str(model_dir), local_files_only=True)
    _resize_class_embedding(model, num_classes)
    return model


def _unet_denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(x, t, class_labels=labels).sample


register_family(Family("unet", _unet_build, _unet_load, _unet_denoise, "unet"))


# ----------------------------------------------------------------------------- build / load / save


def default_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The training noise schedule of new generators (cosine, 1000 steps)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type, clip_sample=True).config)


def new_generator(family: str, arch: str, class_names: list[str], image_size: int, channels: int,
                  prediction_type: str = "epsilon") -> Generator:
    """A randomly initialised generator (training from scratch)."""
    fam = _family(family)
    model = fam.build(arch, image_size, channels, len(class_names))
    return Generator(family, model, default_scheduler_config(prediction_type), list(class_names), image_size, channels)


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise GeneratorError(f"unknown generator family {name!r}; registered: {sorted(FAMILIES)}")
    return FAMILIES[name]


def check_base_dir(path: str | Path, family: str) -> Path:
    """Fail early, naming the path, if a base/generator directory is missing or incomplete."""
    path = Path(path)
    fam = _family(family)
    if not path.is_dir():
        raise GeneratorError(f"generator directory {path} does not exist")
    model_dir = path / fam.model_subdir if (path / fam.model_subdir).is_dir() else path
    if not (model_dir / "config.json").is_file():
        raise GeneratorError(f"{path}: incomplete generator, no {fam.model_subdir}/config.json")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise GeneratorError(f"{model_dir}: incomplete generator, no weights file (*.safetensors)")
    manifest_file = path / "manifest.json"
    if manifest_file.is_file():
        got = json.loads(manifest_file.read_text()).get("family")
        if got != family:
            raise GeneratorError(f"{path}: family/model mismatch: the directory holds a {got!r} generator, config says {family!r}")
    return model_dir


def load_generator(path: str | Path, family: str | None = None, class_names: list[str] | None = None,
                   require_manifest: bool = False) -> Generator:
    """Load a generator (or a plain diffusers base) from a local directory."""
    path = Path(path)
    manifest = {}
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        family = family or manifest["family"]
    elif require_manifest:
        raise GeneratorError(f"{path}: no manifest.json, so this is not a finished synthaug generator export")
    family = family or "unet"
    model_dir = check_base_dir(path, family)
    names = list(class_names or manifest.get("class_names") or [])
    if not names:
        raise GeneratorError(f"{path}: class count of 0 (no class names in the manifest or the config)")
    model = _family(family).load_model(model_dir, len(names))
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else default_scheduler_config()
    image_size = int(manifest.get("image_size") or model.config.sample_size)
    channels = int(manifest.get("channels") or model.config.in_channels)
    return Generator(family, model, sched, names, image_size, channels, manifest)


def save_generator(gen: Generator, path: str | Path, extra: dict) -> dict:
    """Export in diffusers layout (safetensors) with the manifest written last, atomically."""
    from diffusers import DDPMScheduler

    tmp = staging_dir(path)
    fam = _family(gen.family)
    gen.model.save_pretrained(str(tmp / fam.model_subdir), safe_serialization=True)
    DDPMScheduler.from_config(gen.scheduler_config).save_pretrained(str(tmp / "scheduler"))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "generator",
        "family": gen.family,
        "class_names": gen.class_names,
        "null_class": gen.null_class,
        "image_size": gen.image_size,
        "channels": gen.channels,
        "prediction_type": gen.scheduler_config.get("prediction_type", "epsilon"),
        "weights_hash": hash_tree(tmp),
        **extra,
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    commit_dir(tmp, path)
    return manifest
