"""Tiny random-weight bases, one per generator family, built offline from configs.

Each is saved with ``save_pretrained`` in the layout a downloaded checkpoint has (see
:mod:`synthaug.generative.models`), so ``synthaug finetune --base DIR`` takes it exactly
as it takes DiT-XL-2 or Stable Diffusion. They exist to try the fine-tuning path end to
end in seconds on a laptop and in the tests; their samples are noise until trained.

``synthaug tiny-base --family F --out DIR`` calls :func:`save_tiny_base`. Nothing is
downloaded: the text2image tokenizer is a CLIP tokenizer over a byte-level vocabulary
with no merges, so every character is its own token.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from synthaug import storage
from synthaug.artifacts import publish_tree, staging_dir
from synthaug.errors import InputValueError

TINY_FAMILIES = ("unet", "dit", "text2image")


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (GPT-2's ``bytes_to_unicode``), each symbol also as a word end."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return {t: i for i, t in enumerate(tokens)}


def save_vae(root: Path, blocks: tuple[int, ...] = (8, 16)) -> None:
    """A 3-channel ``AutoencoderKL`` with 4 latent channels; factor 2 per block after the first."""
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                  up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks, layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(root / "vae")


def save_latent_scheduler(root: Path) -> None:
    """The noise schedule latent checkpoints ship (linear betas, as DiT and Stable Diffusion)."""
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(root / "scheduler")


def save_tiny_unet(root: Path, image_size: int = 8, channels: int = 1, num_classes: int = 1000) -> Path:
    """A pixel-space ``UNet2DModel`` with a class embedding (``num_classes`` + null): unet/, scheduler/.

    The architecture is synthaug's 'tiny' preset, and the schedule the cosine one synthaug's
    own generators train with.
    """
    from diffusers import DDPMScheduler

    from synthaug.generative import models

    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models.UNET.build("tiny", image_size, channels, num_classes).save_pretrained(root / "unet")
    DDPMScheduler.from_config(models.default_scheduler_config()).save_pretrained(root / "scheduler")
    return root


def save_tiny_dit(root: Path, patch_size: int = 2, vae_blocks: tuple[int, ...] = (8, 16)) -> Path:
    """A DiT in DiT-XL-2-256's layout: transformer/ (1000 classes, learned sigma), vae/, scheduler/."""
    from diffusers import DiTTransformer2DModel

    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                              sample_size=4, patch_size=patch_size, num_embeds_ada_norm=1000).save_pretrained(root / "transformer")
        save_vae(root, vae_blocks)
    save_latent_scheduler(root)
    return root


def save_tiny_text2image(root: Path) -> Path:
    """A Stable-Diffusion-style directory: unet/, vae/, text_encoder/, tokenizer/, scheduler/ (needs transformers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    vocab = byte_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                             attention_head_dim=8, norm_num_groups=32).save_pretrained(root / "unet")
        CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(root / "tokenizer")
        CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1)).save_pretrained(root / "text_encoder")
        save_vae(root)
    save_latent_scheduler(root)
    return root


def save_tiny_base(family: str, out: str | Path, image_size: int = 8, channels: int = 1) -> str:
    """Build family ``family``'s tiny base at location ``out`` (which must not hold anything yet).

    Built in a local temporary directory and published in one step (renamed into place
    locally, uploaded to an object store). ``image_size``/``channels`` shape the
    pixel-space ``unet`` base; the latent families take 8 px (and any multiple of their
    VAE x patch factor) at fine-tuning time.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown generator family {family!r}; tiny bases exist for {TINY_FAMILIES}")
    out = storage.absolute(out)
    if storage.is_file(out) or storage.list_files(out):
        raise InputValueError(f"{out} exists and is not empty; choose another directory (a base is never overwritten)")
    lp = storage.local_path(out)
    tmp = staging_dir(lp) if lp is not None else Path(tempfile.mkdtemp(prefix="synthaug-tiny-base-"))
    if family == "unet":
        save_tiny_unet(tmp, image_size, channels)
    elif family == "dit":
        save_tiny_dit(tmp)
    else:
        save_tiny_text2image(tmp)
    if lp is not None and lp.is_dir():
        lp.rmdir()  # empty
    return publish_tree(tmp, out)
