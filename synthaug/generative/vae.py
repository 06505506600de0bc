"""The VAE of the latent families: loading and checking it, and its posterior as moments.

A leaf of the generative package (diffusers and torch only), shared by the latent families
(:mod:`synthaug.generative.latent`) and the latent cache (:mod:`synthaug.generative.latent_cache`):
``vae_moments`` is what both encode, and ``sample_moments`` draws from it exactly as
``latent_dist.sample()`` would, so a cached run trains on what the pixel path computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from synthaug.generative.registry import GeneratorError

LOGVAR_RANGE = (-30.0, 20.0)


def check_vae(root, vae_cfg: dict | None) -> dict:
    cls = (vae_cfg or {}).get("_class_name")
    if cls != "AutoencoderKL":
        raise GeneratorError(f"{root}: vae/config.json names a {cls!r}; latent families need an 'AutoencoderKL'")
    return vae_cfg


def local_config(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_vae(root: Path) -> nn.Module:
    from diffusers import AutoencoderKL

    check_vae(root, local_config(root / "vae" / "config.json"))
    vae = AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True)
    return vae.requires_grad_(False).eval()


def factor(vae_cfg) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def vae_factor(vae: nn.Module) -> int:
    """How much the VAE downsamples: 2 per block after the first."""
    return factor(vae.config)


def shift(vae: nn.Module) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_moments(vae, x: torch.Tensor) -> torch.Tensor:
    """Pixels (B, C, H, W) in [-1, 1] -> (B, 2, c, h, w): the posterior's mean and clamped log-variance."""
    if x.shape[1] != vae.config.in_channels:  # grayscale: repeat the channel (as vae_encode does)
        x = x.expand(-1, vae.config.in_channels, -1, -1)
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    return torch.stack([dist.mean, dist.logvar], dim=1).float()


def sample_moments(vae, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 2, c, h, w) moments -> scaled latents, drawing the noise ``latent_dist.sample()`` would draw."""
    mean, logvar = moments[:, 0], moments[:, 1].clamp(*LOGVAR_RANGE)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * eps
    return ((z - shift(vae)) * vae.config.scaling_factor).float()
