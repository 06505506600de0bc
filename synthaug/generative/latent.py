"""Latent generator families: ``dit`` (class labels) and ``text2image`` (one prompt per class).

Both run the diffusion in the latent space of a frozen ``AutoencoderKL``: images are
encoded before the loss (``latent_dist.sample() * scaling_factor``) and decoded after
sampling (``/ scaling_factor``). Grayscale data is repeated to the VAE's channels on
the way in and averaged back on the way out. Both are fine-tuned from a local diffusers
directory; neither has a from-scratch preset.

* ``dit``: ``DiTTransformer2DModel`` (``transformer/``). Diffusers keeps one label table
  per block (``transformer_blocks[i].norm1.emb.class_embedder.embedding_table``, sized by
  the ``num_embeds_ada_norm`` config); each is resized to the user's classes + 1 null
  row. DiT predicts eps and (learned sigma) a variance: only the eps half is used.
  Sampling goes through our own guidance loop with null = number of classes. Diffusers'
  ``DiTPipeline`` hard-codes null class 1000, so an export pads every table to 1001 rows
  on disk (null row last, the unused rows copies of it; see :func:`_dit_export`) and a
  reload takes the padding off again.
* ``text2image``: Stable-Diffusion-style ``UNet2DConditionModel`` (``unet/``) with a
  frozen ``CLIPTextModel`` and ``CLIPTokenizer``. Class k is the prompt
  ``template.format(class_name=...)``, the null class the empty prompt; the prompts
  are encoded once into a (K + 1, seq, dim) table looked up by label, so the denoiser
  takes labels like every other family. The UNet is fully fine-tuned, or LoRA
  adapters (peft) are trained and folded into the weights on export.

Both exports carry a ``model_index.json`` (``DiTPipeline`` with ``id2label`` from the class
names; ``StableDiffusionPipeline`` without safety checker), so diffusers loads them as
pipelines; the manifest keeps the prompt template and every class's prompt.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from synthaug.config import prompt_template_problem
from synthaug.generative.registry import Family, GeneratorError, Loaded, LoadSpec, Shape
from synthaug.generative.vae import check_vae, factor, load_vae, sample_moments, shift, vae_factor, vae_moments  # noqa: F401

if TYPE_CHECKING:
    from synthaug.generative.models import Generator

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, as diffusers' LoRA scripts
DIT_PIPELINE_NULL = 1000  # the null class diffusers' DiTPipeline samples classifier-free guidance with


# ----------------------------------------------------------------------------- the VAE


@torch.no_grad()
def vae_encode(gen: Generator, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """Pixels (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f), float32.

    A draw from the VAE's posterior (training), or its mean when ``deterministic``
    (image-to-image sources, diffusers' ``sample_mode="argmax"``).
    """
    vae = gen.components["vae"]
    m = vae_moments(vae, x)
    if deterministic:
        return ((m[:, 0] - shift(vae)) * vae.config.scaling_factor).float()
    # latent_dist.sample(), written out so that the latent cache draws exactly what this draws.
    return sample_moments(vae, m)


@torch.no_grad()
def vae_decode(gen: Generator, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, c, h, w) -> pixels (B, gen.channels, h f, w f), float32."""
    vae = gen.components["vae"]
    x = vae.decode((z / vae.config.scaling_factor + shift(vae)).to(vae.dtype)).sample  # (B, C_vae, H, W)
    if x.shape[1] != gen.channels:  # back to grayscale
        x = x.mean(dim=1, keepdim=True)
    return x.float()


def _latent_shape(gen: Generator) -> tuple[int, int, int]:
    vae = gen.components["vae"]
    f = vae_factor(vae)
    return (int(vae.config.latent_channels), gen.image_size // f, gen.image_size // f)


def _pixel_channels(root, spec: LoadSpec, vae_cfg) -> int:
    vc = int(vae_cfg["in_channels"])
    c = spec.channels or vc
    if c not in (1, vc):
        raise GeneratorError(f"{root}: the data has {c} channels but the VAE takes {vc}; "
                             f"only grayscale (repeated) or {vc}-channel images work")
    return c


def _image_size(root, family: str, spec: LoadSpec, native_latent: int, vae_f: int, model_f: int, what: str) -> int:
    """The pixel size to run at (the data's, else the model's own), checked against the model."""
    size = spec.image_size or int(native_latent) * vae_f
    step = vae_f * model_f
    if size % step:
        raise GeneratorError(f"{root}: image size {size} is incompatible with the model: family {family!r} needs a "
                             f"size divisible by {step} (VAE factor {vae_f} x {what} {model_f})")
    return size


# ----------------------------------------------------------------------------- DiT


def _resize_label_tables(model: nn.Module, num_classes: int, trained_classes: int = 0) -> None:
    """Give every block's label table ``num_classes + 1`` rows, the last one the null class.

    A table's null row is row ``num_embeds_ada_norm`` (diffusers' convention). Rows trained
    for these classes are kept: a base's with ``num_classes`` classes, or an export's
    (``trained_classes``, its manifest's count; on disk its tables are padded for
    ``DiTPipeline``, see :func:`_dit_export`). With a different class count the new classes
    have nothing to do with the old ones, so every row starts from the old null row (the
    unconditional model). Diffusers' own label dropout is switched off: it would redraw in
    every block, and the training loop already drops labels to the null class once per sample.
    """
    want = num_classes + 1
    for block in model.transformer_blocks:
        emb = block.norm1.emb.class_embedder
        table, own = emb.embedding_table, emb.num_classes
        has_null = table.num_embeddings > own
        keep = has_null and (trained_classes or own) == num_classes and own >= num_classes
        if not (keep and own == num_classes):
            old_null = table.weight[own] if has_null else table.weight.mean(0)
            rows = torch.cat([table.weight[:num_classes], old_null[None]]) if keep else old_null.expand(want, -1)
            new = nn.Embedding(want, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(rows)
            emb.embedding_table = new
        emb.num_classes = num_classes
        emb.dropout_prob = 0.0
    model.register_to_config(num_embeds_ada_norm=num_classes)


def _dit_export(model: nn.Module) -> nn.Module:
    """The DiT to save: a copy whose label tables ``DiTPipeline`` can guide with.

    The pipeline takes class 1000 as the null class, whatever the model's class count, so
    with K < 1000 classes each table is padded to 1001 rows: the K class rows, copies of the
    null row, the null row at 1000 (labels 0..K behave as before). The copy shares every
    other parameter with ``model``, which is left unchanged. With K >= 1000 it is saved as is
    (at K > 1000, the pipeline's guidance would use class 1000 as null; see docs/families.md).
    """
    k = int(model.config.num_embeds_ada_norm)
    if k >= DIT_PIPELINE_NULL:
        return model
    out = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})  # new modules, shared weights
    for block in out.transformer_blocks:
        emb = block.norm1.emb.class_embedder
        w = emb.embedding_table.weight  # (K + 1, D), the null row last
        padded = torch.cat([w[:k], w[k:].expand(DIT_PIPELINE_NULL + 1 - k, -1)])  # (1001, D)
        emb.embedding_table = nn.Embedding.from_pretrained(padded.detach().clone(), freeze=False)
        emb.num_classes = DIT_PIPELINE_NULL
    out.register_to_config(num_embeds_ada_norm=DIT_PIPELINE_NULL)
    return out


def _dit_pipeline_config(class_names: list[str]) -> dict:
    """``DiTPipeline``'s labels: ``pipe.get_label_ids([name])`` -> the class's index."""
    return {"id2label": {str(i): name for i, name in enumerate(class_names)}}


def _dit_shape(root, spec: LoadSpec, c, vae_c) -> Shape:
    """Checks of a DiT base's configs (``c`` the transformer's, ``vae_c`` the VAE's); the pixel shape it runs at."""
    if c.get("norm_type") != "ada_norm_zero" or c.get("num_embeds_ada_norm") is None:
        raise GeneratorError(f"{root}: the DiT is not class-conditional (norm_type {c.get('norm_type')!r}, "
                             f"num_embeds_ada_norm {c.get('num_embeds_ada_norm')!r})")
    check_vae(root, vae_c)
    cin, cout = c["in_channels"], c.get("out_channels")
    if vae_c["latent_channels"] != cin:
        raise GeneratorError(f"{root}: the VAE makes {vae_c['latent_channels']}-channel latents, the DiT takes {cin}")
    if (cout or cin) not in (cin, 2 * cin):
        raise GeneratorError(f"{root}: DiT out_channels {cout} is neither in_channels nor 2 x in_channels")
    size = _image_size(root, "dit", spec, c["sample_size"], factor(vae_c), c["patch_size"], "patch size")
    return Shape(size, _pixel_channels(root, spec, vae_c))


def _dit_probe(read_config, root: str, spec: LoadSpec) -> Shape:
    return _dit_shape(root, spec, read_config("transformer/config.json") or {}, read_config("vae/config.json"))


def _dit_load(root: Path, spec: LoadSpec) -> Loaded:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(root / "transformer"), local_files_only=True)
    vae = load_vae(root)
    shape = _dit_shape(root, spec, dict(model.config), dict(vae.config))
    _resize_label_tables(model, len(spec.class_names), spec.trained_classes)
    return Loaded(model, {"vae": vae}, shape.image_size, shape.channels, {})


def _dit_denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = model(x, timestep=t, class_labels=labels).sample  # (B, C or 2C, h, w)
    return out[:, : x.shape[1]]  # the eps half; the rest is DiT's learned variance


DIT = Family("dit", None, _dit_load, _dit_denoise, "transformer", "DiTTransformer2DModel", ("vae",),
             vae_encode, vae_decode, _latent_shape, _dit_export, latent=True, probe=_dit_probe,
             pipeline="DiTPipeline", pipeline_config=_dit_pipeline_config)


# ----------------------------------------------------------------------------- text-to-image


class PromptConditionedUNet(nn.Module):
    """A ``UNet2DConditionModel`` called with class labels: label k -> the cached embedding of prompt k."""

    def __init__(self, unet: nn.Module, prompt_embeds: torch.Tensor):
        super().__init__()
        self.unet = unet
        # (K + 1, seq, dim), from the frozen text encoder; derived, so not saved in checkpoints.
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        context = self.prompt_embeds[labels]  # (B, seq, dim)
        return self.unet(x, t, encoder_hidden_states=context).sample


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str], chunk: int = 64) -> torch.Tensor:
    """Last hidden states of the text encoder (as Stable Diffusion uses them): (P, seq, dim)."""
    length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
    out = []
    for i in range(0, len(prompts), chunk):
        ids = tokenizer(prompts[i:i + chunk], padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(text_encoder.device))[0].float())
    return torch.cat(out)


def _add_lora(unet: nn.Module, rank: int) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def _t2i_shape(root, spec: LoadSpec, c, vae_c, text_c) -> Shape:
    """Checks of a text2image base's configs (UNet, VAE, text encoder); the pixel shape it runs at."""
    problem = prompt_template_problem(spec.prompt_template)
    if problem:
        raise GeneratorError(problem)
    extra = c.get("addition_embed_type") or c.get("class_embed_type")
    if extra:
        raise GeneratorError(f"{root}: the UNet also takes {extra!r} conditioning (SDXL-style); "
                             f"family 'text2image' takes text-only UNets (Stable Diffusion 1/2)")
    check_vae(root, vae_c)
    width = (text_c or {}).get("hidden_size")
    if width != c.get("cross_attention_dim"):
        raise GeneratorError(f"{root}: text encoder width {width} != UNet cross_attention_dim {c.get('cross_attention_dim')}")
    if vae_c["latent_channels"] != c["in_channels"]:
        raise GeneratorError(f"{root}: the VAE makes {vae_c['latent_channels']}-channel latents, the UNet takes {c['in_channels']}")
    size = _image_size(root, "text2image", spec, c.get("sample_size") or 64, factor(vae_c),
                       2 ** (len(c["block_out_channels"]) - 1), "UNet downsampling")
    return Shape(size, _pixel_channels(root, spec, vae_c))


def _t2i_probe(read_config, root: str, spec: LoadSpec) -> Shape:
    return _t2i_shape(root, spec, read_config("unet/config.json") or {}, read_config("vae/config.json"),
                      read_config("text_encoder/config.json"))


def _t2i_load(root: Path, spec: LoadSpec) -> Loaded:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    problem = prompt_template_problem(spec.prompt_template)
    if problem:  # before any weights are read
        raise GeneratorError(problem)
    unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True)
    vae = load_vae(root)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True)
    text_encoder.requires_grad_(False).eval()
    size, channels = _t2i_shape(root, spec, dict(unet.config), dict(vae.config), text_encoder.config.to_dict())

    # One prompt per class, the empty prompt last (the null class).
    prompts = [spec.prompt_template.format(class_name=name) for name in spec.class_names] + [""]
    embeds = encode_prompts(tokenizer, text_encoder, prompts)
    if spec.lora_rank:
        _add_lora(unet, spec.lora_rank)
    meta = {"prompt_template": spec.prompt_template, "prompts": prompts, "lora_rank": spec.lora_rank}
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    return Loaded(PromptConditionedUNet(unet, embeds), parts, size, channels, meta)


def _t2i_denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(x, t, labels)


def _t2i_export(model: nn.Module) -> nn.Module:
    """The plain UNet to save; trained LoRA adapters are folded into its weights first."""
    unet = model.unet
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.fuse_lora()
        unet.unload_lora()
    return unet


def _t2i_pipeline_config(class_names: list[str]) -> dict:
    """``StableDiffusionPipeline`` without its safety checker (class k's prompt is in the manifest's ``prompts``)."""
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


TEXT2IMAGE = Family("text2image", None, _t2i_load, _t2i_denoise, "unet", "UNet2DConditionModel",
                    ("vae", "text_encoder", "tokenizer"), vae_encode, vae_decode, _latent_shape, _t2i_export,
                    latent=True, probe=_t2i_probe, pipeline="StableDiffusionPipeline",
                    pipeline_config=_t2i_pipeline_config)
