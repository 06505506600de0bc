"""Plain-PyTorch diffusion cores, independent of Ray: the training loss and the sampling loop.

Sampling is deterministic per sample: image i's initial noise (and, for DDPM, every
step's noise) comes from its own ``torch.Generator`` seeded with ``seeds[i]``, so an
image does not depend on which batch or actor it was sampled in.

Guidance convention: ``eps = eps_uncond + w * (eps_cond - eps_uncond)``; w = 1 is purely
conditional and skips the unconditional pass; w = 0 is purely unconditional.

Both work on pixels and call ``gen.encode`` / ``gen.decode`` at the edges, so a latent
family diffuses in its VAE's latent space with the same code (identity for ``unet``).

Image-to-image (SDEdit, as DA-Fusion uses it): given ``init`` pixels and a ``strength``
s in (0, 1], sampling starts from the source encoded (the VAE's mean for latent
families, so it needs no random draw) and noised with the scheduler's ``add_noise`` to
the timestep at index ``steps - int(steps * s)`` of the schedule, and runs only the
remaining steps (diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``). The
noise is the sample's own seeded draw, as in text-to-image sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synthaug.errors import InputValueError

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


# ----------------------------------------------------------------------------- training


def diffusion_loss(gen, x0: torch.Tensor, labels: torch.Tensor, noise_scheduler, *, prediction_type: str = "epsilon",
                   min_snr_gamma: float = 0.0, generator: torch.Generator | None = None,
                   encoded: bool = False) -> torch.Tensor:
    """Standard denoising loss on clean images ``x0`` (B, C, H, W) in [-1, 1] with class ``labels`` (B,).

    ``encoded``: ``x0`` is already in the diffusion space (B, *gen.latent_shape), e.g. drawn
    from a latent cache's moments.
    """
    if not encoded:
        x0 = gen.encode(x0)  # (B, *gen.latent_shape); the same tensor for pixel-space families
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=x0.device)
    xt = noise_scheduler.add_noise(x0, noise, t)
    pred = gen.denoise(xt, t, labels)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma > 0:
        # Min-SNR weighting (Hang et al., 2023): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v.
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, t)  # (B,) alpha_bar / (1 - alpha_bar)
        w = torch.clamp(snr, max=min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        per_sample = per_sample * w
    return per_sample.mean()


def lr_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up from 0, then cosine decay to 0 at ``total`` (diffusers' ``get_cosine_schedule_with_warmup``)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)


# ----------------------------------------------------------------------------- sampling


def per_sample_noise(seeds: list[int], shape: tuple, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list]:
    """Initial noise (B, *shape) from one generator per sample; returns it and the generators."""
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    return x, gens


def cfg_passes(w: float) -> int:
    """Denoiser evaluations per step at guidance ``w``: one at w = 1 or w = 0 (see ``_guided``), else two."""
    return 1 if w in (0.0, 1.0) else 2


def _guided(gen, x: torch.Tensor, t, labels: torch.Tensor, w: float) -> torch.Tensor:
    """Model output with classifier-free guidance; one pass at w = 1 (or w = 0)."""
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    null = torch.full_like(labels, gen.null_class)
    if w == 1.0:
        return gen.denoise(x, tt, labels)
    if w == 0.0:
        return gen.denoise(x, tt, null)
    out = gen.denoise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
    cond, uncond = out.chunk(2)
    return uncond + w * (cond - uncond)


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first timestep an image-to-image run denoises from (diffusers' ``get_timesteps``)."""
    if not 0.0 < strength <= 1.0:
        raise InputValueError(f"config key 'sample.strength' must be in (0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise InputValueError(f"config keys 'sample.strength' x 'sample.steps' = {strength} x {steps} leaves no "
                              f"denoising step (int(steps * strength) must be >= 1)")
    return steps - init_timestep


def noised_source(gen, sched, init: torch.Tensor, noise: torch.Tensor, steps: int,
                  strength: float) -> tuple[torch.Tensor, list[int]]:
    """Image-to-image start: the source ``init`` (B, C, H, W) encoded and noised with ``noise``
    (B, *latent_shape) by ``sched.add_noise`` to the strength's first timestep; returns it and the
    timesteps still to run. ``sched`` has had ``set_timesteps(steps)``; its begin index is set here."""
    start = img2img_start(steps, strength) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    z0 = gen.encode(init.float(), deterministic=True)  # (B, *latent_shape)
    first = sched.timesteps[start:start + 1].repeat(z0.shape[0]).to(z0.device)  # (B,)
    return sched.add_noise(z0, noise.to(z0.dtype), first), [int(t) for t in sched.timesteps[start:]]


def make_scheduler(sampler: str, scheduler_config: dict):
    """A diffusers scheduler for ``sampler`` built from the generator's training schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if sampler not in SAMPLERS:
        raise InputValueError(f"config key 'sample.sampler': unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=False)
    if sampler == "dpmsolver++":
        # With the cosine schedule, DPM-Solver++ saturates images: its first steps sit at
        # sigma/alpha ~ 160, which multiplies any eps error into the x0 prediction. Clip the
        # lowest-SNR lambdas (diffusers' recommended -5.1) and, as DDIM's clip_sample does,
        # bound the x0 prediction (per-sample dynamic thresholding at 1.0).
        cosine = scheduler_config.get("beta_schedule") == "squaredcos_cap_v2"
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
            lambda_min_clipped=-5.1 if cosine else -float("inf"), final_sigmas_type="zero",
            thresholding=bool(scheduler_config.get("clip_sample", True)), sample_max_value=1.0)
    return DDPMScheduler.from_config(scheduler_config, timestep_spacing="trailing")


def _ddpm_step(sched, eps: torch.Tensor, t: int, t_prev: int, x: torch.Tensor, gens: list, v: float,
               clip: bool = True) -> torch.Tensor:
    """One ancestral DDPM step over a respaced schedule, with per-sample noise.

    The variance interpolates in log space between the posterior variance (v = 0) and
    beta_t (v = 1), the coefficient the paper tunes: exp(v log beta + (1 - v) log beta~).
    ``clip`` bounds the x0 prediction to [-1, 1] (pixels; never latents).
    """
    abar = sched.alphas_cumprod.to(x.device, torch.float64)
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64, device=x.device)
    beta = 1 - a_t / a_prev
    x64, eps64 = x.double(), eps.double()
    x0 = (x64 - (1 - a_t).sqrt() * eps64) / a_t.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x64
    if t_prev < 0:
        return mean.to(x.dtype)
    post_var = beta * (1 - a_prev) / (1 - a_t)
    log_var = v * torch.log(beta) + (1 - v) * torch.log(post_var.clamp(min=1e-20))
    noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens]).to(x.device)
    return (mean + (0.5 * log_var).exp() * noise).to(x.dtype)


@torch.inference_mode()
def sample_images(gen, labels: list[int], seeds: list[int], *, guidance_scale: float, sampler: str = "ddim",
                  steps: int = 50, ddpm_log_variance_v: float = 1.0, device: str | torch.device = "cpu",
                  autocast_dtype: torch.dtype | None = None, counter: dict | None = None, scheduler=None,
                  init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Sample one image per (label, seed); returns float pixels (B, C, H, W) in [-1, 1].

    ``scheduler``: a diffusers scheduler to step with instead of ``make_scheduler(sampler, ...)``
    (to compare constructions; not with ``sampler='ddpm'``, whose step is synthaug's own).
    ``init``: source pixels (B, C, H, W) in [-1, 1] for image-to-image at ``strength``
    (see the module docstring); None samples from pure noise (``strength`` unused).
    """
    if steps < 1:
        raise InputValueError("config key 'sample.steps' must be >= 1")
    if guidance_scale < 0:
        raise InputValueError("config key 'sample.guidance_scale' must be >= 0")
    if scheduler is not None and sampler == "ddpm":
        raise ValueError("sample_images: a custom scheduler replaces the 'ddim' / 'dpmsolver++' step, not 'ddpm'")
    sched = scheduler if scheduler is not None else make_scheduler(sampler, gen.scheduler_config)
    sched.set_timesteps(steps, device=device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    x, gens = per_sample_noise(seeds, gen.latent_shape, device)  # (B, *latent_shape)
    if init is None:
        x = x * sched.init_noise_sigma
        timesteps = [int(t) for t in sched.timesteps]
    else:
        x, timesteps = noised_source(gen, sched, init.to(device), x, steps, strength)
    prediction_type = gen.scheduler_config.get("prediction_type", "epsilon")
    clip = bool(gen.scheduler_config.get("clip_sample", True))
    for i, t in enumerate(timesteps):
        xin = sched.scale_model_input(x, t)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = _guided(gen, xin, t, y, guidance_scale).float()
        if counter is not None:
            counter["denoiser_calls"] = counter.get("denoiser_calls", 0) + cfg_passes(guidance_scale)
        if sampler == "ddpm":
            if prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x
                a = sched.alphas_cumprod.to(x.device)[t]
                out = a.sqrt() * out + (1 - a).sqrt() * x
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x = _ddpm_step(sched, out, t, t_prev, x, gens, ddpm_log_variance_v, clip)
        else:
            x = sched.step(out, t, x).prev_sample
    return gen.decode(x).clamp(-1, 1)  # (B, C, H, W) pixels
