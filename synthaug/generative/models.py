"""Generator registry: one name-keyed family per model kind, loaded from local directories.

A *generator directory* is diffusers ``save_pretrained`` layout plus our manifest::

    <generator>/
      unet/ | transformer/  config.json + diffusion_pytorch_model.safetensors (the denoiser)
      vae/                  latent families: the frozen AutoencoderKL
      text_encoder/         text2image: the frozen CLIPTextModel
      tokenizer/            text2image: its CLIPTokenizer
      scheduler/            scheduler_config.json (the training noise schedule)
      manifest.json         family, class_names, null_class, image size, hashes, config

Families: ``unet`` (pixel-space UNet2DModel with a class embedding), ``dit`` (latent
DiTTransformer2DModel with a resized label table) and ``text2image`` (latent
UNet2DConditionModel conditioned on one prompt per class); the last two live in
:mod:`synthaug.generative.latent`. Every family answers the same calls --
``denoise(model, x, t, labels)``, ``encode``/``decode`` between pixels and the space
the diffusion runs in -- so training and sampling never ask which family they hold.

``load_generator`` also accepts a plain diffusers directory (no manifest) as a *base*
to fine-tune from; exported generators always carry the manifest, and the sampler
refuses a directory without one. Nothing is downloaded unless ``allow_downloads``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from synthaug.artifacts import SCHEMA_VERSION, atomic_write_json, commit_dir, hash_tree, read_manifest, staging_dir

ARCHS = {
    # name: (block_out_channels, layers_per_block, norm groups)
    "tiny": ((32, 64), 1, 16),
    "small": ((64, 128), 2, 16),
}
DEFAULT_PROMPT_TEMPLATE = "a photo of a {class_name}"


class GeneratorError(ValueError):
    """A generator directory or family is wrong; the message names it."""


@dataclass
class Generator:
    """A loaded generator: the denoiser, its frozen parts, its training noise schedule and its manifest.

    ``model`` is the only trained module. ``components`` holds the frozen parts a family
    needs and exports unchanged (``vae``, ``text_encoder``, ``tokenizer``); ``meta`` holds
    family settings recorded in the manifest (e.g. the prompt template).
    ``image_size``/``channels`` describe the pixel images it takes and makes.
    """

    family: str
    model: nn.Module
    scheduler_config: dict
    class_names: list[str]
    image_size: int
    channels: int
    manifest: dict = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return len(self.class_names)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the space the diffusion runs in (pixels for ``unet``)."""
        return FAMILIES[self.family].latent_shape(self)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Model output (eps or v) for noisy ``x`` (B, *latent_shape), timesteps (B,), labels (B,)."""
        return FAMILIES[self.family].denoise(self.model, x, t, labels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, channels, H, W) in [-1, 1] -> the diffusion space (B, *latent_shape)."""
        return FAMILIES[self.family].encode(self, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion space (B, *latent_shape) -> pixels (B, channels, H, W), roughly in [-1, 1]."""
        return FAMILIES[self.family].decode(self, z)

    def to(self, device: torch.device | str) -> "Generator":
        self.model.to(device)
        for part in self.components.values():
            if isinstance(part, nn.Module):
                part.to(device)
        return self


@dataclass(frozen=True)
class LoadSpec:
    """What a caller asks of a loaded generator; zeros and '' mean "the model's own"."""

    class_names: tuple[str, ...]
    image_size: int = 0
    channels: int = 0
    prompt_template: str = ""
    lora_rank: int = 0


class Loaded(NamedTuple):
    """What a family's loader returns."""

    model: nn.Module
    components: dict
    image_size: int
    channels: int
    meta: dict


def _identity(gen: Generator, x: torch.Tensor) -> torch.Tensor:
    return x


def _pixel_shape(gen: Generator) -> tuple[int, int, int]:
    return (gen.channels, gen.image_size, gen.image_size)


def _same(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class Family:
    """How to build, load, call, encode for and save one kind of generator."""

    name: str
    build: Callable[..., nn.Module] | None  # a new model from an `arch` preset; None: fine-tune from a base only
    load_model: Callable[[Path, LoadSpec], Loaded]  # from a generator root directory
    denoise: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    model_subdir: str
    model_class: str  # the diffusers class <model_subdir>/config.json must name
    components: tuple[str, ...] = ()  # other subfolders a base needs, besides scheduler/
    encode: Callable[[Generator, torch.Tensor], torch.Tensor] = _identity
    decode: Callable[[Generator, torch.Tensor], torch.Tensor] = _identity
    latent_shape: Callable[[Generator], tuple[int, int, int]] = _pixel_shape
    export_model: Callable[[nn.Module], nn.Module] = _same  # the diffusers model to save_pretrained
    latent: bool = False  # diffusion in a VAE's latent space (no [-1, 1] clipping of x0)


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


def _unet_load(root: Path, spec: LoadSpec) -> Loaded:
    from diffusers import UNet2DModel

    model_dir = subdir(root, FAMILIES["unet"])
    model = UNet2DModel.from_pretrained(str(model_dir), local_files_only=True)
    _resize_class_embedding(model, len(spec.class_names))
    return Loaded(model, {}, int(model.config.sample_size), int(model.config.in_channels), {})


def _unet_denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(x, t, class_labels=labels).sample


register_family(Family("unet", _unet_build, _unet_load, _unet_denoise, "unet", "UNet2DModel"))


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
    if fam.build is None:
        raise GeneratorError(f"family {family!r} is fine-tuned from a pretrained model only: set 'finetune.base' "
                             f"(or --base) to a local diffusers directory")
    model = fam.build(arch, image_size, channels, len(class_names))
    return Generator(family, model, default_scheduler_config(prediction_type), list(class_names), image_size, channels)


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise GeneratorError(f"unknown generator family {name!r}; registered: {sorted(FAMILIES)}")
    return FAMILIES[name]


def subdir(root: Path, fam: Family) -> Path:
    """Where a family's denoiser lives under a generator root (a flat directory works too)."""
    return root / fam.model_subdir if (root / fam.model_subdir).is_dir() else root


def config_class(model_dir: Path) -> str | None:
    """The ``_class_name`` in ``model_dir/config.json``, or None when there is no config."""
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise GeneratorError(f"{cfg}: unreadable config ({e})") from None


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.bin"))


def _family_of_class(cls: str | None) -> str | None:
    return next((f.name for f in FAMILIES.values() if f.model_class == cls), None)


def check_base_dir(path: str | Path, family: str) -> Path:
    """Fail early, naming the path, if a base/generator directory is missing, incomplete or of another family."""
    path = Path(path)
    fam = _family(family)
    if not path.is_dir():
        raise GeneratorError(f"generator directory {path} does not exist")
    manifest_file = path / "manifest.json"
    if manifest_file.is_file():
        got = json.loads(manifest_file.read_text()).get("family")
        if got != family:
            raise GeneratorError(f"{path}: family/model mismatch: the directory holds a {got!r} generator, config says {family!r}")

    # The denoiser: present, of the class this family loads, with weights.
    model_dir = subdir(path, fam)
    cls = config_class(model_dir)
    if cls is None:
        for other in FAMILIES.values():
            other_cls = config_class(subdir(path, other))
            if other is not fam and other_cls == other.model_class:
                raise GeneratorError(f"{path}: family/model mismatch: it holds a {other_cls} ({other.model_subdir}/), "
                                     f"a {other.name!r} model, but the config says family {family!r}")
        raise GeneratorError(f"{path}: incomplete generator, no {fam.model_subdir}/config.json")
    if cls != fam.model_class:
        owner = _family_of_class(cls)
        hint = f" (that is family {owner!r})" if owner else ""
        raise GeneratorError(f"{path}: family/model mismatch: {model_dir.name}/config.json names a {cls!r}{hint}, "
                             f"but family {family!r} needs a {fam.model_class!r}")
    if not _has_weights(model_dir):
        raise GeneratorError(f"{model_dir}: incomplete generator, no weights file (*.safetensors)")

    # The frozen parts, and the noise schedule a pretrained latent model was trained with.
    for name in fam.components:
        d = path / name
        if name == "tokenizer":
            if not ((d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()):
                raise GeneratorError(f"{path}: incomplete generator, no tokenizer/tokenizer.json or tokenizer/vocab.json")
        elif not (d / "config.json").is_file():
            raise GeneratorError(f"{path}: incomplete generator, no {name}/config.json")
        elif not _has_weights(d):
            raise GeneratorError(f"{d}: incomplete generator, no weights file (*.safetensors)")
    if fam.latent and not (path / "scheduler" / "scheduler_config.json").is_file():
        raise GeneratorError(f"{path}: incomplete generator, no scheduler/scheduler_config.json "
                             f"(a pretrained model must be fine-tuned with its own noise schedule)")
    return model_dir


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_base(base: str | Path, family: str, allow_downloads: bool = False) -> Path:
    """A base as a checked local directory; a hub id is fetched here, and only with ``allow_downloads``."""
    path = Path(base)
    if not path.exists() and _HUB_ID.match(str(base)):
        if not allow_downloads:
            raise GeneratorError(
                f"base {str(base)!r} does not exist locally and looks like a Hugging Face hub id, but downloads are "
                f"off (config key 'allow_downloads' is false). Fetch it first, e.g. `hf download {base} "
                f"--local-dir /models/NAME`, and pass that directory; or set allow_downloads=true")
        from huggingface_hub import snapshot_download

        fam = _family(family)
        wanted = [f"{d}/*" for d in (fam.model_subdir, *fam.components, "scheduler")] + ["model_index.json"]
        path = Path(snapshot_download(str(base), allow_patterns=wanted,
                                      ignore_patterns=["*.fp16.*", "*.ckpt", "*.msgpack", "*.onnx*", "*.h5", "*non_ema*"]))
    check_base_dir(path, family)
    return path


def load_generator(path: str | Path, family: str | None = None, class_names: list[str] | None = None,
                   require_manifest: bool = False, *, image_size: int = 0, channels: int = 0,
                   prompt_template: str = "", lora_rank: int = 0) -> Generator:
    """Load a generator (or a plain diffusers base) from a local directory.

    ``image_size``/``channels`` are those of the data it will train on (latent families
    run at any size their VAE and denoiser divide; 0 = the manifest's or the model's).
    ``prompt_template`` (text2image; '' = the manifest's or the default) and
    ``lora_rank`` (text2image; 0 = full fine-tuning) shape what is trained.
    """
    path = Path(path)
    manifest = {}
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        family = family or manifest["family"]
    elif require_manifest:
        raise GeneratorError(f"{path}: no manifest.json, so this is not a finished synthaug generator export")
    family = family or "unet"
    fam = _family(family)
    check_base_dir(path, family)
    names = list(class_names or manifest.get("class_names") or [])
    if not names:
        raise GeneratorError(f"{path}: class count of 0 (no class names in the manifest or the config)")
    spec = LoadSpec(tuple(names), image_size or int(manifest.get("image_size") or 0),
                    channels or int(manifest.get("channels") or 0),
                    prompt_template or manifest.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, lora_rank)
    loaded = fam.load_model(path, spec)
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else default_scheduler_config()
    if fam.latent:  # latents are not bounded to [-1, 1]: never clip or threshold x0 there
        sched = {**sched, "clip_sample": False, "thresholding": False}
    return Generator(family, loaded.model, sched, names, loaded.image_size, loaded.channels, manifest,
                     loaded.components, loaded.meta)


def save_generator(gen: Generator, path: str | Path, extra: dict) -> dict:
    """Export in diffusers layout (safetensors) with the manifest written last, atomically."""
    from diffusers import DDPMScheduler

    tmp = staging_dir(path)
    fam = _family(gen.family)
    fam.export_model(gen.model).save_pretrained(str(tmp / fam.model_subdir), safe_serialization=True)
    for name, part in gen.components.items():  # frozen parts, unchanged
        part.save_pretrained(str(tmp / name))
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
        **gen.meta,
        "weights_hash": hash_tree(tmp),
        **extra,
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    commit_dir(tmp, path)
    return manifest


# The latent families register themselves on import; importing them here keeps the
# registry complete for anyone who imports this module.
from synthaug.generative import latent  # noqa: E402,F401
