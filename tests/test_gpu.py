"""The Ray-free compute cores on a CUDA device: skipped where there is none (CI, this repo's CPU machines).

Run where a GPU is lent: ``python -m pytest tests/test_gpu.py`` (needs torch, timm, diffusers,
transformers; no Ray). What a GPU changes and the CPU tests cannot see: channels_last and
bf16 autocast in the classifier's epoch, the sampler's device placement (noise is drawn on
the CPU per sample, then moved), and a generator family's frozen parts (VAE, text encoder)
following the denoiser to the device.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    """Full-precision fp32 matmuls and convolutions, so CPU and GPU results can be compared."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_classifier_epoch_with_amp_and_channels_last_learns():
    from synthaug.classify.core import eval_counts, metrics_from_counts, train_epoch
    from synthaug.classify.models import build_classifier
    from synthaug.config import ClassifyConfig

    cfg = ClassifyConfig(model="resnet18", amp=True, channels_last=True)
    model = build_classifier(cfg, 10, 3, seed=0).cuda().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g)  # (B, 3, H, W): a fixed batch to memorise
    y = torch.randint(0, 10, (64,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [{"image": x, "label": y}] * 30
    stats = train_epoch(model, batches, opt, None, torch.nn.CrossEntropyLoss(), "cuda", amp=True, channels_last=True)
    assert stats["images"] == 64 * 30 and stats["step"] == 30
    counts = eval_counts({"m": model}, [{"image": x.numpy(), "label": y.numpy()}], 10, "cuda")
    assert metrics_from_counts(counts["m"], 10)["top1"] > 90.0  # memorised: bf16 autocast trained it


@pytest.mark.parametrize("family", ["unet", "dit", "text2image"])
def test_sampling_on_gpu_matches_cpu_and_its_batch(tmp_path, family):
    from synthaug.generative import models
    from synthaug.generative.diffusion import sample_images
    from synthaug.generative.tiny import save_tiny_base

    names = ["zero", "one", "two"]
    if family == "unet":
        gen = models.new_generator("unet", "tiny", names, 8, 1)
    else:
        gen = models.load_generator(save_tiny_base(family, tmp_path / family), family, names, image_size=8, channels=1)
    gen.model.eval()
    kw = dict(guidance_scale=2.0, sampler="ddim", steps=4)
    cpu = sample_images(gen, [0, 1, 2], [1, 2, 3], **kw)
    gen.to("cuda")
    gpu = sample_images(gen, [0, 1, 2], [1, 2, 3], device="cuda", **kw)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (3, 1, 8, 8)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)  # same noise (drawn on the CPU per sample), same maths
    # Per-sample seeds on the GPU too: an image does not depend on the batch it was drawn in.
    part = sample_images(gen, [1], [2], device="cuda", **kw)
    assert torch.allclose(part, gpu[1:2], atol=1e-4)
    bf16 = sample_images(gen, [0, 1, 2], [1, 2, 3], device="cuda", autocast_dtype=torch.bfloat16, **kw)
    assert torch.isfinite(bf16).all() and (bf16 - gpu).abs().mean() < 0.1
