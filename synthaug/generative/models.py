"""Generators: the loaded-model type, the ``unet`` family, and build / check / load / save at any location.

A *generator directory* is diffusers ``save_pretrained`` layout plus our manifest::

    <generator>/
      unet/ | transformer/  config.json + diffusion_pytorch_model.safetensors (the denoiser)
      vae/                  latent families: the frozen AutoencoderKL
      text_encoder/         text2image: the frozen CLIPTextModel
      tokenizer/            text2image: its CLIPTokenizer
      scheduler/            scheduler_config.json (the training noise schedule)
      model_index.json      dit, text2image: the diffusers pipeline that loads the export (Family.pipeline)
      manifest.json         family, class_names, null_class, image size, hashes, config

Families come from :mod:`synthaug.generative.registry`: ``unet`` (pixel-space
UNet2DModel with a class embedding, defined here), ``dit`` and ``text2image`` (latent,
in :mod:`synthaug.generative.latent`). Every family answers the same calls --
``denoise(model, x, t, labels)``, ``encode``/``decode`` between pixels and the space
the diffusion runs in -- so training and sampling never ask which family they hold.

A directory may be a local path or a URI (``s3://...``): checks and probes read its
small files through :mod:`synthaug.storage`; loading copies it to a local cache keyed
by its manifest's ``weights_hash`` (diffusers ``from_pretrained`` reads local
directories only); exports are built locally and published manifest last.
``load_generator`` also accepts a plain diffusers directory (no manifest) as a *base*
to fine-tune from; the sampler refuses a directory without one. Nothing is
downloaded from the hub unless ``allow_downloads``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synthaug import storage
from synthaug.artifacts import MANIFEST, SCHEMA_VERSION, hash_tree, publish_tree, read_manifest, staging_dir
from synthaug.config import HUB_ID
from synthaug.generative import registry
from synthaug.generative.registry import Family, GeneratorError, Loaded, LoadSpec, Shape  # noqa: F401 (re-exported)

ARCHS = {
    # name: (block_out_channels, layers_per_block, norm groups)
    "tiny": ((32, 64), 1, 16),
    "small": ((64, 128), 2, 16),
}
DEFAULT_PROMPT_TEMPLATE = "a photo of a {class_name}"


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
        return registry.get(self.family).latent_shape(self)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Model output (eps or v) for noisy ``x`` (B, *latent_shape), timesteps (B,), labels (B,)."""
        return registry.get(self.family).denoise(self.model, x, t, labels)

    def encode(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Pixels (B, channels, H, W) in [-1, 1] -> the diffusion space (B, *latent_shape).

        ``deterministic``: a latent family takes its VAE posterior's mean instead of a draw
        (image-to-image sources: no random state, so a sample depends on its seed alone).
        """
        fam = registry.get(self.family)
        return fam.encode(self, x, deterministic=True) if deterministic else fam.encode(self, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion space (B, *latent_shape) -> pixels (B, channels, H, W), roughly in [-1, 1]."""
        return registry.get(self.family).decode(self, z)

    def to(self, device: torch.device | str) -> "Generator":
        self.model.to(device)
        for part in self.components.values():
            if isinstance(part, nn.Module):
                part.to(device)
        return self


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


def _unet_probe(read_config, root: str, spec: LoadSpec) -> Shape:
    c = read_config("unet/config.json") or read_config("config.json") or {}
    if not c.get("num_class_embeds"):
        raise GeneratorError(f"{root}: base UNet has no class embedding (num_class_embeds unset); "
                             f"it cannot be class-conditioned")
    return Shape(int(c["sample_size"]), int(c["in_channels"]))


def _unet_load(root: Path, spec: LoadSpec) -> Loaded:
    from diffusers import UNet2DModel

    model_dir = subdir(root, UNET)
    model = UNet2DModel.from_pretrained(str(model_dir), local_files_only=True)
    _resize_class_embedding(model, len(spec.class_names))
    return Loaded(model, {}, int(model.config.sample_size), int(model.config.in_channels), {})


def _unet_denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(x, t, class_labels=labels).sample


UNET = Family("unet", _unet_build, _unet_load, _unet_denoise, "unet", "UNet2DModel", probe=_unet_probe)


# ----------------------------------------------------------------------------- build


def default_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The training noise schedule of new generators (cosine, 1000 steps)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type, clip_sample=True).config)


def new_generator(family: str, arch: str, class_names: list[str], image_size: int, channels: int,
                  prediction_type: str = "epsilon") -> Generator:
    """A randomly initialised generator (training from scratch)."""
    fam = registry.get(family)
    if fam.build is None:
        raise GeneratorError(f"family {family!r} is fine-tuned from a pretrained model only: set 'finetune.base' "
                             f"(or --base) to a local diffusers directory")
    model = fam.build(arch, image_size, channels, len(class_names))
    return Generator(family, model, default_scheduler_config(prediction_type), list(class_names), image_size, channels)


# ----------------------------------------------------------------------------- checks (any location)


def subdir(root: str | Path, fam: Family) -> str:
    """Where a family's denoiser lives under a generator root (a flat directory works too)."""
    d = storage.join(root, fam.model_subdir)
    return d if storage.is_dir(d) else str(root)


def read_config(location: str | Path) -> dict | None:
    """A JSON config file at any location, or None when there is none."""
    if not storage.is_file(location):
        return None
    return registry.parse_config(storage.read_text(location), str(location))


def config_class(model_dir: str | Path) -> str | None:
    """The ``_class_name`` in ``model_dir/config.json``, or None when there is no config."""
    cfg = read_config(storage.join(model_dir, "config.json"))
    return None if cfg is None else cfg.get("_class_name")


def _has_weights(d: str) -> bool:
    return any(i.path.endswith((".safetensors", ".bin")) for i in storage.list_files(d, recursive=False))


def _family_of_class(cls: str | None) -> str | None:
    return next((f.name for f in registry.families() if f.model_class == cls), None)


def check_base_dir(path: str | Path, family: str) -> str:
    """Fail early, naming the path, if a base/generator directory is missing, incomplete or of another family.

    Reads only small files (configs, listings), so it is cheap on an object store too.
    Returns the location of the denoiser's directory.
    """
    path = str(path)
    fam = registry.get(family)
    if not storage.is_dir(path):
        raise GeneratorError(f"generator directory {path} does not exist")
    manifest = read_config(storage.join(path, MANIFEST))
    if manifest is not None and manifest.get("family") != family:
        raise GeneratorError(f"{path}: family/model mismatch: the directory holds a {manifest.get('family')!r} "
                             f"generator, config says {family!r}")

    # The denoiser: present, of the class this family loads, with weights.
    model_dir = subdir(path, fam)
    cls = config_class(model_dir)
    if cls is None:
        for other in registry.families():
            other_cls = config_class(subdir(path, other))
            if other is not fam and other_cls == other.model_class:
                raise GeneratorError(f"{path}: family/model mismatch: it holds a {other_cls} ({other.model_subdir}/), "
                                     f"a {other.name!r} model, but the config says family {family!r}")
        raise GeneratorError(f"{path}: incomplete generator, no {fam.model_subdir}/config.json")
    if cls != fam.model_class:
        owner = _family_of_class(cls)
        hint = f" (that is family {owner!r})" if owner else ""
        raise GeneratorError(f"{path}: family/model mismatch: {storage.basename(model_dir)}/config.json names a "
                             f"{cls!r}{hint}, but family {family!r} needs a {fam.model_class!r}")
    if not _has_weights(model_dir):
        raise GeneratorError(f"{model_dir}: incomplete generator, no weights file (*.safetensors)")

    # The frozen parts, and the noise schedule a pretrained latent model was trained with.
    for name in fam.components:
        d = storage.join(path, name)
        if name == "tokenizer":
            if not (storage.is_file(storage.join(d, "tokenizer.json")) or storage.is_file(storage.join(d, "vocab.json"))):
                raise GeneratorError(f"{path}: incomplete generator, no tokenizer/tokenizer.json or tokenizer/vocab.json")
        elif not storage.is_file(storage.join(d, "config.json")):
            raise GeneratorError(f"{path}: incomplete generator, no {name}/config.json")
        elif not _has_weights(d):
            raise GeneratorError(f"{d}: incomplete generator, no weights file (*.safetensors)")
    if fam.latent and not storage.is_file(storage.join(path, "scheduler", "scheduler_config.json")):
        raise GeneratorError(f"{path}: incomplete generator, no scheduler/scheduler_config.json "
                             f"(a pretrained model must be fine-tuned with its own noise schedule)")
    return model_dir


def probe_base(path: str | Path, family: str, spec: LoadSpec) -> tuple[Shape, dict]:
    """A checked base's pixel shape for ``spec`` and its training noise schedule, from its configs alone.

    What the driver checks before training starts, without reading (or downloading) weights.
    """
    path = str(path)
    check_base_dir(path, family)
    fam = registry.get(family)
    shape = fam.probe(lambda rel: read_config(storage.join(path, rel)), path, spec) if fam.probe else None
    sched = read_config(storage.join(path, "scheduler", "scheduler_config.json")) or default_scheduler_config()
    return shape, sched


def resolve_base(base: str | Path, family: str, allow_downloads: bool = False) -> str:
    """A base as a checked location (local absolute path or URI); a hub id is fetched only with ``allow_downloads``."""
    base = str(base)
    if not storage.is_uri(base) and not storage.exists(base) and HUB_ID.match(base):
        if not allow_downloads:
            raise GeneratorError(
                f"base {base!r} does not exist locally and looks like a Hugging Face hub id, but downloads are "
                f"off (config key 'allow_downloads' is false). Fetch it first, e.g. `hf download {base} "
                f"--local-dir /models/NAME`, and pass that directory; or set allow_downloads=true")
        from huggingface_hub import snapshot_download

        fam = registry.get(family)
        wanted = [f"{d}/*" for d in (fam.model_subdir, *fam.components, "scheduler")] + ["model_index.json"]
        base = str(snapshot_download(base, allow_patterns=wanted,
                                     ignore_patterns=["*.fp16.*", "*.ckpt", "*.msgpack", "*.onnx*", "*.h5", "*non_ema*"]))
    base = storage.absolute(base)  # workers run in their own directories
    check_base_dir(base, family)
    return base


# ----------------------------------------------------------------------------- load / save


def load_generator(path: str | Path, family: str | None = None, class_names: list[str] | None = None,
                   require_manifest: bool = False, *, image_size: int = 0, channels: int = 0,
                   prompt_template: str = "", lora_rank: int = 0) -> Generator:
    """Load a generator (or a plain diffusers base) from a location (local directory or URI).

    ``image_size``/``channels`` are those of the data it will train on (latent families
    run at any size their VAE and denoiser divide; 0 = the manifest's or the model's).
    ``prompt_template`` (text2image; '' = the manifest's or the default) and
    ``lora_rank`` (text2image; 0 = full fine-tuning) shape what is trained.
    """
    import json

    path = str(path)
    manifest = {}
    if storage.is_file(storage.join(path, MANIFEST)):
        manifest = read_manifest(path)
        family = family or manifest["family"]
    elif require_manifest:
        raise GeneratorError(f"{path}: no manifest.json, so this is not a finished synthaug generator export")
    family = family or "unet"
    fam = registry.get(family)
    check_base_dir(path, family)
    names = list(class_names or manifest.get("class_names") or [])
    if not names:
        raise GeneratorError(f"{path}: class count of 0 (no class names in the manifest or the config)")
    spec = LoadSpec(tuple(names), image_size or int(manifest.get("image_size") or 0),
                    channels or int(manifest.get("channels") or 0),
                    prompt_template or manifest.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, lora_rank,
                    len(manifest.get("class_names") or []))
    root = storage.localize(path, key=manifest.get("weights_hash") or None)  # a local dir for from_pretrained
    loaded = fam.load_model(root, spec)
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else default_scheduler_config()
    if fam.latent:  # latents are not bounded to [-1, 1]: never clip or threshold x0 there
        sched = {**sched, "clip_sample": False, "thresholding": False}
    return Generator(family, loaded.model, sched, names, loaded.image_size, loaded.channels, manifest,
                     loaded.components, loaded.meta)


def _drop_source_paths(root: Path) -> None:
    """Remove diffusers' ``_name_or_path`` (where a model was loaded from) from saved configs.

    It records a location, not content: two exports with equal weights loaded from bases at
    different paths would otherwise get different ``weights_hash`` values (and keys).
    """
    for f in Path(root).rglob("*.json"):
        try:
            cfg = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(cfg, dict) and "_name_or_path" in cfg:
            del cfg["_name_or_path"]
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_model_index(root: Path, fam: Family, model: nn.Module, components: dict, scheduler,
                       class_names: list[str]) -> None:
    """``model_index.json`` for ``fam.pipeline``, as diffusers writes it (the pipeline built from the parts).

    Its init arguments that the pipeline keeps out of its own config (``DiTPipeline``'s
    ``id2label``) are recorded too, so ``from_pretrained`` passes them back.
    """
    import warnings

    import diffusers

    cls = getattr(diffusers, fam.pipeline)
    extra = fam.pipeline_config(class_names)
    with warnings.catch_warnings():  # its checks of the parts' configs (e.g. a scheduler's steps_offset) warn on load
        warnings.simplefilter("ignore", FutureWarning)
        pipe = cls(**{fam.model_subdir: model, **components, "scheduler": scheduler}, **extra)
    pipe.register_to_config(**{k: v for k, v in extra.items() if k not in pipe.config})
    pipe.save_config(str(root))


def save_generator(gen: Generator, path: str | Path, extra: dict) -> dict:
    """Export in diffusers layout (safetensors) to a location: built locally, published manifest last.

    A family with a diffusers pipeline (``Family.pipeline``) also gets its ``model_index.json``;
    one that a base came with is never copied. ``weights_hash`` is the hash of the local tree
    before it is uploaded.
    """
    from diffusers import DDPMScheduler

    lp = storage.local_path(path)
    tmp = staging_dir(lp) if lp is not None else Path(tempfile.mkdtemp(prefix="synthaug-generator-"))
    fam = registry.get(gen.family)
    model = fam.export_model(gen.model)
    model.save_pretrained(str(tmp / fam.model_subdir), safe_serialization=True)
    for name, part in gen.components.items():  # frozen parts, unchanged
        part.save_pretrained(str(tmp / name))
    DDPMScheduler.from_config(gen.scheduler_config).save_pretrained(str(tmp / "scheduler"))
    if fam.pipeline:  # a scheduler object of its own: a pipeline may rewrite the config it is given
        _write_model_index(tmp, fam, model, gen.components, DDPMScheduler.from_config(gen.scheduler_config),
                           gen.class_names)
    _drop_source_paths(tmp)
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
    publish_tree(tmp, path, manifest)
    return manifest
