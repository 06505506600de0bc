"""What a run costs on GPUs: GPU-hours and wall time per stage, before anything runs.

``synthaug estimate --config jobs/configs/imagenet.yaml --gpus 8 --gpu-type h100``

Each stage is (images it processes) x (seconds per image on one GPU):

- **measured**, where ``results/bench/*.json`` holds a GPU figure for this stage, model and
  image size on this GPU type (the benchmarks' ``gpu_throughput`` list: ``{stage, model,
  image_size, images_per_s, device_name}``, images/s on one GPU);
- **FLOP estimate** otherwise: FLOPs per image counted by ``torch.utils.flop_counter`` on the
  real architectures built on the meta device (no weights, no memory, no download), divided
  by ``mfu`` x the GPU's dense bf16 peak.

Architectures counted: the text2image family as Stable Diffusion 1.x (UNet2DConditionModel,
cross-attention 768, latents at size/8; the AutoencoderKL that encodes training images and
decodes samples), DiT-XL/2 (DiTTransformer2DModel, 28 layers, 16 heads x 72), timm
classifiers at the ingest size (ResNet-50 for the ImageNet config) and Inception-v3 at 299
for the features. Counted per image: fine-tune = VAE encode + 3 x denoiser forward (forward
and backward; 4 x with gradient checkpointing); sampling = steps x CFG passes x denoiser +
VAE decode; classifier training = 3 x forward per training image + 1 x forward per val
image per epoch. The frozen CLIP text encoder runs once per class and is left out.

Wall time assumes every stage spreads over all ``gpus`` with linear scaling and stages run
one after another; data loading keeps up (CPU workers beside the GPUs). Real runs lose some
of that to start-up, checkpoints and stragglers: read the figures as a floor.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from synthaug.config import Config
from synthaug.errors import InputValueError

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's data sheets (SXM parts).
GPU_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "b200": 2250.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0}
GPU_NAMES = {"h100": "H100", "h200": "H200", "b200": "B200", "a100": "A100", "l40s": "L40S", "l4": "L4"}

# Assumed model-FLOP utilisation per kind of work, where nothing was measured. Diffusion
# denoisers at batch >= 64 are large matmuls and attention (0.30-0.35); ResNet-50 training is
# conv/BatchNorm- and input-bound: MLPerf's tuned H100 runs reach ~18%, a PyTorch + timm
# pipeline less (0.10); Inception inference 0.15.
DEFAULT_MFU = {"finetune": 0.35, "sample": 0.30, "classifier": 0.10, "features": 0.15}

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1K train; the estimate's default dataset size


@dataclass(frozen=True)
class Row:
    """One stage of the estimate."""

    stage: str
    images: int  # images processed (training images x epochs, samples, features)
    gflop_per_image: float  # 0 when measured
    images_per_s_per_gpu: float
    source: str  # 'measured (<device>)' or 'FLOP estimate'

    @property
    def gpu_hours(self) -> float:
        return self.images / self.images_per_s_per_gpu / 3600.0


# ----------------------------------------------------------------------------- FLOPs of the real architectures


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=None)
def gflops(arch: str, image_size: int) -> float:
    """Forward GFLOPs for one image of ``arch`` at ``image_size`` pixels, counted on the meta device.

    ``arch``: 'sd-unet', 'sd-vae-encode', 'sd-vae-decode', 'dit-xl-2', 'inception-v3' or a timm
    model name. Latent models work at ``image_size // 8``.
    """
    import torch

    latent = max(1, image_size // 8)
    with torch.device("meta"):
        if arch == "sd-unet":
            from diffusers import UNet2DConditionModel

            m = UNet2DConditionModel(cross_attention_dim=768, sample_size=latent)
            x, t, text = torch.randn(1, 4, latent, latent), torch.tensor([1]), torch.randn(1, 77, 768)
            return _count(lambda: m(x, t, encoder_hidden_states=text)) / 1e9
        if arch in ("sd-vae-encode", "sd-vae-decode"):
            from diffusers import AutoencoderKL

            m = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
            if arch == "sd-vae-encode":
                img = torch.randn(1, 3, image_size, image_size)
                return _count(lambda: m.encode(img)) / 1e9
            z = torch.randn(1, 4, latent, latent)
            return _count(lambda: m.decode(z)) / 1e9
        if arch == "dit-xl-2":
            from diffusers import DiTTransformer2DModel

            m = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                      num_layers=28, patch_size=2, sample_size=latent, num_embeds_ada_norm=1000)
            x, t, y = torch.randn(1, 4, latent, latent), torch.tensor([1]), torch.tensor([1])
            return _count(lambda: m(x, timestep=t, class_labels=y)) / 1e9
        if arch == "inception-v3":
            import torchvision

            m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
            return _count(lambda: m(torch.randn(1, 3, 299, 299))) / 1e9
        import timm

        m = timm.create_model(arch, pretrained=False, num_classes=1000)
        return _count(lambda: m(torch.randn(1, 3, image_size, image_size))) / 1e9


# ----------------------------------------------------------------------------- measured figures


def measured(bench_dir: str | Path, stage: str, model: str, image_size: int, gpu_type: str,
             match: dict | None = None) -> tuple[float, str] | None:
    """(images/s on one GPU, device name) from a GPU benchmark JSON for this stage, or None.

    ``match``: settings the figure depends on (sampling's sampler, steps and CFG passes); an
    entry that records one of them with another value is not used.
    """
    want = GPU_NAMES.get(gpu_type, gpu_type).lower()
    for path in sorted(Path(bench_dir).glob("*.json")) if Path(bench_dir).is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for rec in data.get("gpu_throughput", []) if isinstance(data, dict) else []:
            if (rec.get("stage") == stage and rec.get("model") == model and int(rec.get("image_size", 0)) == image_size
                    and want in str(rec.get("device_name", "")).lower() and float(rec.get("images_per_s", 0)) > 0
                    and all(rec.get(k, v) == v for k, v in (match or {}).items())):
                return float(rec["images_per_s"]), str(rec["device_name"])
    return None


# ----------------------------------------------------------------------------- the plan


def estimate(cfg: Config, gpu_type: str = "h100", *, train_images: int = IMAGENET_TRAIN_IMAGES,
             mfu: dict | None = None, bench_dir: str | Path = "results/bench", fid_samples: int = 50_000) -> list[Row]:
    """The rows of the estimate for ``cfg`` on ``gpu_type`` (per GPU; divide by GPUs for wall time)."""
    if gpu_type not in GPU_PEAK_TFLOPS:
        raise InputValueError(f"--gpu-type {gpu_type!r}: choose from {sorted(GPU_PEAK_TFLOPS)}")
    mfu = {**DEFAULT_MFU, **(mfu or {})}
    peak = GPU_PEAK_TFLOPS[gpu_type] * 1e12
    size = cfg.ingest.image_size or 256
    n_classes = len(cfg.ingest.class_names) or 1000
    n_val = max(n_classes, round(train_images * cfg.ingest.val_fraction))
    n_train = train_images - n_val
    f, s, c = cfg.finetune, cfg.sample, cfg.classify
    rows: list[Row] = []

    def add(stage: str, kind: str, model: str, images: int, gflop: float, match: dict | None = None) -> None:
        got = measured(bench_dir, kind, model, size, gpu_type, match)
        if got:
            rows.append(Row(stage, images, 0.0, got[0], f"measured ({got[1]})"))
        else:
            rows.append(Row(stage, images, gflop, peak * mfu[kind] / (gflop * 1e9), "FLOP estimate"))

    # Fine-tune: every training image is encoded by the VAE, then one forward + backward.
    denoiser = {"text2image": "sd-unet", "dit": "dit-xl-2"}.get(f.family)
    if denoiser is None:
        raise InputValueError(f"config key 'finetune.family': estimate covers 'text2image' and 'dit', not {f.family!r}")
    fwd = gflops(denoiser, size)
    passes = 4 if f.gradient_checkpointing else 3
    add(f"fine-tune {f.family} ({denoiser}, {f.steps} steps x {f.batch_size})", "finetune", denoiser,
        f.steps * f.batch_size * f.grad_accum, gflops("sd-vae-encode", size) + passes * fwd)

    # Sampling: steps x CFG passes of the denoiser, one VAE decode per image.
    n_samples = sum(s.class_counts.values()) if s.class_counts else s.per_class * n_classes
    from synthaug.generative.diffusion import cfg_passes

    passes = cfg_passes(s.guidance_scale)
    per_sample = s.steps * passes * fwd + gflops("sd-vae-decode", size)
    add(f"sample {n_samples:,} ({s.sampler}, {s.steps} steps, w={s.guidance_scale:g})", "sample", denoiser, n_samples, per_sample,
        {"sampler": s.sampler, "steps": s.steps, "cfg_passes": passes})

    # Features: the in-domain extractor (trained on real train; the near-copy audit's features) and FID.
    cls_fwd = gflops(c.model, size)
    add(f"extractor: {c.model} on real train, {cfg.evaluate.extractor_epochs} epochs", "classifier", c.model,
        n_train * cfg.evaluate.extractor_epochs, 3 * cls_fwd)
    fid_model = "inception-v3" if cfg.evaluate.extractor == "inception-v3-compat" else c.model
    add(f"FID@{fid_samples // 1000}K features ({fid_model}: {fid_samples:,} synthetic + {n_val:,} real)", "features",
        fid_model, fid_samples + n_val, gflops(fid_model, size) if fid_model != c.model else cls_fwd)

    # Classifiers: each sweep ratio x seed, plus CAS (synthetic only) per guidance; the same
    # optimiser steps as real-only (epoch_images 0 = the real rows), validation every epoch.
    epoch_images = c.epoch_images or n_train
    per_run = c.epochs * (epoch_images * 3 * cls_fwd + n_val * cls_fwd)
    for r in cfg.sweep.ratios:
        label = "real only" if float(r) == 0 else f"{float(r):g}:1 synthetic:real"
        add(f"classifier {c.model} {label}, {c.epochs} epochs x {len(c.seeds)} seed(s)", "classifier", c.model,
            c.epochs * epoch_images * len(c.seeds), per_run / (c.epochs * epoch_images))
    add(f"CAS: {c.model} on synthetic only x {len(c.seeds)} seed(s) x {len(cfg.sweep.guidance_scales)} guidance",
        "classifier", c.model, c.epochs * epoch_images * len(c.seeds) * len(cfg.sweep.guidance_scales),
        per_run / (c.epochs * epoch_images))
    return rows


def table(rows: list[Row], gpus: int, gpu_type: str, mfu: dict | None = None) -> str:
    """The estimate as a markdown table with a total row and the assumptions below it."""
    mfu = {**DEFAULT_MFU, **(mfu or {})}
    head = (f"| stage | images | GFLOP/image | source | images/s/GPU | GPU-hours | wall @ {gpus}x {GPU_NAMES[gpu_type]} |\n"
            "| --- | ---: | ---: | --- | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        g = f"{r.gflop_per_image:,.0f}" if r.gflop_per_image else "-"
        lines.append(f"| {r.stage} | {r.images:,} | {g} | {r.source} | {r.images_per_s_per_gpu:,.1f} | "
                     f"{_hours(r.gpu_hours)} | {_wall(r.gpu_hours / gpus)} |")
    total = sum(r.gpu_hours for r in rows)
    lines.append(f"| **total** | | | | | **{_hours(total)}** | **{_wall(total / gpus)}** |")
    notes = (f"\nFLOP estimates: dense bf16 peak {GPU_PEAK_TFLOPS[gpu_type]:g} TFLOP/s per {GPU_NAMES[gpu_type]}, MFU "
             + ", ".join(f"{k} {v:.0%}" for k, v in mfu.items())
             + "; linear scaling over all GPUs, stages one after another (a floor, not a promise).")
    return head + "\n".join(lines) + "\n" + notes


def _hours(h: float) -> str:
    """GPU-hours with enough digits that a small stage does not print as 0."""
    return f"{h:,.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2g}"


def _wall(hours: float) -> str:
    if hours < 1 / 3600:
        return "<1 s"
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} d"


def run(cfg: Config, gpus: int, gpu_type: str, *, train_images: int = IMAGENET_TRAIN_IMAGES, mfu: float | None = None,
        bench_dir: str | Path = "results/bench") -> str:
    """``synthaug estimate``: the table as text."""
    if gpus < 1:
        raise InputValueError("--gpus must be >= 1")
    over = {k: mfu for k in DEFAULT_MFU} if mfu else None
    if mfu is not None and not 0 < mfu <= 1:
        raise InputValueError("--mfu must be in (0, 1]")
    rows = estimate(cfg, gpu_type, train_images=train_images, mfu=over, bench_dir=bench_dir)
    assert all(r.images > 0 and math.isfinite(r.gpu_hours) for r in rows)
    return table(rows, gpus, gpu_type, over)
