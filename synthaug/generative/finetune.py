"""Generator training: class-conditional fine-tuning, and pretraining; one Ray task, or Ray Train (DDP).

Pretraining on an unlabelled pool is the same loop with every label set to the null
class. One function, :func:`train_loop_per_worker`, runs for 1 worker (in a plain Ray
task, as the classifier's one worker does) and for N (Ray Train workers), for
every generator family: the loss encodes images through the family (identity for
``unet``, a frozen VAE for ``dit`` and ``text2image``), and only parameters that require
grad (all, or LoRA adapters) are optimised and tracked by the EMA. Its step is
:class:`TrainCore`, plain PyTorch without Ray, which the throughput benchmark's plain
loop and the tests drive directly.

Data (:mod:`synthaug.generative.train_data`): each worker streams its own share of
every epoch -- the shards in a seeded per-epoch order, its contiguous slice of their
rows, a seeded local shuffle buffer -- read and decoded in Ray Data tasks anywhere in
the cluster; nothing is materialised unless ``cache`` asks for the decoded set in the
object store. Steps count optimiser steps over epochs of that stream. Checkpoints
(rank 0, every N steps) hold model, EMA, optimiser, LR schedule, step and RNG state at
the run's location, on any storage (Ray Train's storage for N workers,
:class:`synthaug.checkpoints.TaskCheckpoints` for one). Runs are keyed by content
(:func:`run_key`: the result-changing config fields, the data's content hash and the
base's hash): the run is ``<storage>/<stage>-<key[:12]>`` and the export's manifest holds
the key, so a re-run of the same command reuses a finished export or resumes from the
latest checkpoint, and a changed hyperparameter or input trains anew. The
noise of each optimiser step is seeded from (seed, rank, step), so a resumed run ends
with the same weights as an undisturbed one, and a restarted worker group
re-reads the current epoch and skips the micro-batches already consumed, so the final
step count is exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synthaug import console, identity, storage, tracking
from synthaug.artifacts import DatasetError, hash_tree, is_complete, read_manifest
from synthaug.config import Config, TrainGenConfig, to_dict
from synthaug.data.images import to_float
from synthaug.errors import InputValueError
from synthaug.generative import latent_cache, models, registry, train_data
from synthaug.generative.diffusion import diffusion_loss, lr_schedule
from synthaug.shuffle import BatchMix, warn_if_blocked

STATE_FILE = "train_state.json"


# ----------------------------------------------------------------------------- resume


def _state_steps(run: str) -> list[int]:
    fs, _ = storage.resolve(run)
    steps = []
    for info in storage.list_files(run):
        if info.base_name == STATE_FILE:
            with fs.open_input_stream(info.path) as f:
                steps.append(int(json.loads(f.read())["step"]))
    return steps


def latest_step(run: str | Path) -> int:
    """The step of the checkpoint a run will resume from (0 when none), at any storage location.

    One worker (a Ray task): its committed checkpoint's pointer (``synthaug.checkpoints``).
    N workers: Train V2's checkpoint-manager snapshot, not the newest directory: a
    checkpoint written but not yet registered when a run died is not resumed from.
    """
    from synthaug.checkpoints import TaskCheckpoints

    task = TaskCheckpoints(str(run)).latest_metrics()
    if task:
        return int(task.get("step", 0))
    snap = storage.join(run, "checkpoint_manager_snapshot.json")
    if storage.is_file(snap):
        latest = storage.read_json(snap).get("latest_checkpoint_result") or {}
        return int(latest.get("metrics", {}).get("step", 0))
    return max(_state_steps(str(run)), default=0)


# ----------------------------------------------------------------------------- worker


def checkpoint_state(model: torch.nn.Module) -> dict:
    """The model state a checkpoint keeps: all of it, or with frozen parameters (LoRA) only the trained ones.

    A LoRA run's frozen base weights are re-read from the base directory on resume, so a
    checkpoint of a Stable-Diffusion-size UNet holds megabytes of adapters, not gigabytes.
    """
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def _save_checkpoint(dirpath: str, model, ema, opt, sched, step: int, rng: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint_state(model).items()},
              os.path.join(dirpath, "model.safetensors"))
    ema_state = ema.state_dict()
    save_file({f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))},
              os.path.join(dirpath, "ema.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "ema": ema_state, "rng": rng},
               os.path.join(dirpath, "state.pt"))
    with open(os.path.join(dirpath, STATE_FILE), "w") as f:
        json.dump({"step": step}, f)


def _load_checkpoint(dirpath: str, model, ema, opt, sched) -> tuple[int, torch.Tensor]:
    from safetensors.torch import load_file

    saved = load_file(os.path.join(dirpath, "model.safetensors"))
    missing, unexpected = model.load_state_dict(saved, strict=False)
    lost = set(missing) & {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or lost:  # frozen base weights may be absent (they come from the base); nothing else may
        raise RuntimeError(f"{dirpath}: checkpoint does not match the model (unexpected {sorted(unexpected)[:3]}, "
                           f"missing trained {sorted(lost)[:3]})")
    state = torch.load(os.path.join(dirpath, "state.pt"), weights_only=True)
    shadow = load_file(os.path.join(dirpath, "ema.safetensors"))
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    step = json.loads(Path(dirpath, STATE_FILE).read_text())["step"]
    return step, state["rng"]


def state_sums(ema, opt) -> dict:
    """Checksums of EMA weights and optimiser moments (a resume test compares them with the checkpoint)."""
    ema_sum = sum(float(p.double().sum()) for p in ema.shadow_params)
    opt_sum = sum(float(v.double().sum()) for st in opt.state.values() for k, v in st.items()
                  if torch.is_tensor(v) and k.startswith("exp_avg"))
    return {"ema_sum": ema_sum, "opt_sum": opt_sum}


def save_val_grid(gen, ema, params, path: str | Path, steps: int = 20, guidance_scale: float = 2.0) -> None:
    """One image per class (seed = class index) from the EMA weights, as a PNG row at a location."""
    import io

    from PIL import Image

    from synthaug.data.images import from_float
    from synthaug.generative.diffusion import sample_images

    ema.store(params)
    ema.copy_to(params)
    was_training = gen.model.training
    gen.model.eval()
    try:
        k = len(gen.class_names)
        x = sample_images(gen, list(range(k)), list(range(k)), guidance_scale=guidance_scale, steps=steps,
                          device=next(iter(params)).device)
    finally:
        ema.restore(params)
        gen.model.train(was_training)
    imgs = from_float(x.float().cpu()).transpose(0, 2, 3, 1)  # (K, H, W, C)
    row = np.concatenate(list(imgs), axis=1)  # (H, K*W, C)
    row = row[:, :, 0] if row.shape[2] == 1 else row
    buf = io.BytesIO()
    Image.fromarray(row).resize((row.shape[1] * 4, row.shape[0] * 4), Image.Resampling.NEAREST).save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())


def _load(t: TrainGenConfig, base: str, class_names: list[str], image_size: int, channels: int) -> models.Generator:
    """The generator to train: loaded from location ``base`` for the data's image size, or new from ``t.arch``."""
    if base:
        return models.load_generator(base, t.family, class_names, image_size=image_size, channels=channels,
                                     prompt_template=t.prompt_template, lora_rank=t.lora_rank)
    return models.new_generator(t.family, t.arch, class_names, image_size, channels, t.prediction_type)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that are trained (all, or only LoRA adapters); the EMA follows the same list."""
    return [p for p in model.parameters() if p.requires_grad]


class TrainCore:
    """One worker's training state and step, without Ray (the core :func:`train_loop_per_worker` wraps).

    Construction seeds so that all ranks start identical, loads or builds the generator,
    and sets up what is trained (``trainable``), the EMA over it, AdamW and the LR
    schedule; :meth:`begin` starts the per-rank noise stream and wraps the model (DDP);
    :meth:`micro_step` runs one micro-batch. A plain loop that feeds it the same batch
    stream (:func:`plan_tensors`) computes what a 1-worker run computes.
    """

    def __init__(self, t: TrainGenConfig, base: str, class_names: list[str], image_size: int, channels: int, *,
                 device: torch.device | str = "cpu", rank: int = 0, unconditional: bool = False,
                 moments: bool = False):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.t, self.rank, self.unconditional = t, rank, unconditional
        self.moments = moments  # micro-batches are latent-cache VAE moments, not pixels
        self.device = torch.device(device)
        torch.manual_seed(t.seed)
        self.gen = _load(t, base, class_names, image_size, channels)
        self.noise_sched = DDPMScheduler.from_config(self.gen.scheduler_config)
        self.raw_model = self.gen.to(self.device).model  # frozen parts (VAE, text encoder) go to the device too
        self.params = trainable(self.raw_model)
        self.ema = EMAModel(self.params, decay=t.ema_decay)
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.sched = lr_schedule(self.opt, t.warmup_steps, t.steps)
        self.rng = torch.Generator().manual_seed(t.seed * 1000 + rank)  # label dropout and flips
        self.autocast = self.device.type == "cuda" and t.mixed_precision in ("auto", "bf16")
        self.step, self.images, self.last_loss, self._micro = 0, 0, float("nan"), 0

    def restore(self, dirpath: str) -> dict:
        """Load a checkpoint; returns checksums of the restored EMA and optimiser state."""
        self.step, _ = _load_checkpoint(dirpath, self.raw_model, self.ema, self.opt, self.sched)
        self.rng = torch.Generator().manual_seed(self.t.seed * 1000 + self.rank + 7919 * self.step)
        return state_sums(self.ema, self.opt)

    def save(self, dirpath: str) -> None:
        _save_checkpoint(dirpath, self.raw_model, self.ema, self.opt, self.sched, self.step, self.rng.get_state())

    def begin(self, wrap=None) -> None:
        """Start training at ``self.step``; ``wrap`` turns the model into its DDP form (N workers)."""
        # Per-rank (and per-resume) stream for the loss's noise and timesteps: with one shared
        # seed every DDP worker would draw the same noise for its different images.
        torch.manual_seed(self.t.seed * 1000 + self.rank + 7919 * self.step + 1)
        self.ema.to(self.device)
        if self.t.gradient_checkpointing:
            self.raw_model.enable_gradient_checkpointing()
        self.gen.model = wrap(self.raw_model) if wrap else self.raw_model
        self.gen.model.train()

    def micro_step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One micro-batch: pixels (B, C, H, W) in [-1, 1], labels (B,). True when it completed an optimiser step.

        With ``moments``, ``x`` is (B, 2 or 4, c, h, w) from a latent cache: the image's VAE
        moments, then the mirrored image's; a flip picks the second pair, and the latent is
        drawn as the VAE would draw it (the same random numbers, in the same order).
        """
        t, null = self.t, self.gen.null_class
        if self._micro % t.grad_accum == 0:
            # Noise, timesteps, label dropout and flips of each optimiser step are a pure function of
            # (seed, rank, step), so a run resumed from a checkpoint repeats an undisturbed one exactly.
            s = (t.seed * 1_000_003 + self.rank) * 1_000_003 + self.step
            torch.manual_seed(s)
            self.rng.manual_seed(s + 1)
        if self.unconditional:
            y = torch.full_like(y, null)
        elif t.label_dropout > 0:  # label dropout to the null class, for CFG
            drop = torch.rand(y.shape, generator=self.rng).to(y.device) < t.label_dropout
            y = torch.where(drop, torch.full_like(y, null), y)
        if t.hflip:
            flip = (torch.rand(x.shape[0], generator=self.rng) < 0.5).to(x.device)
            if self.moments:
                x = torch.where(flip[:, None, None, None, None], x[:, 2:4], x[:, 0:2])
            else:
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        elif self.moments:
            x = x[:, 0:2]
        if self.moments:
            from synthaug.generative.latent_cache import sample_moments

            x = sample_moments(self.gen.components["vae"], x)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = diffusion_loss(self.gen, x, y, self.noise_sched, prediction_type=t.prediction_type,
                                  min_snr_gamma=t.min_snr_gamma, generator=None, encoded=self.moments)
        (loss / t.grad_accum).backward()
        self.images += x.shape[0]
        self._micro += 1
        if self._micro % t.grad_accum:
            return False
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.ema.step(self.params)
        self.step += 1
        self.last_loss = float(loss.detach())
        return True


def plan_tensors(data_dir: str | Path, t: TrainGenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batches a 1-worker run of ``t`` trains on, decoded in this process (Ray-free), concatenated.

    Pixels (steps x grad_accum x batch, C, H, W) in [-1, 1] and labels, in training order:
    the same stream (:func:`train_data.stream`, rank 0 of 1) that the Ray worker reads
    through Ray Data. For bounded runs only (tests, the benchmark): it holds them all.
    """
    import itertools

    m = read_manifest(data_dir)
    locations, rows = train_data.shard_locations(storage.absolute(data_dir), m)
    buffer = train_data.shuffle_rows(t, rows, m["channels"], m["image_size"][0])
    it = train_data.stream(train_data.local_source(locations), rows, t.seed, 0, 1, t.batch_size, buffer)
    xs, ys = zip(*itertools.islice(it, t.steps * t.grad_accum))
    return torch.from_numpy(to_float(np.concatenate(xs))), torch.from_numpy(np.concatenate(ys))


def plain_loop(core: TrainCore, x: torch.Tensor, y: torch.Tensor, on_step=None) -> TrainCore:
    """Drive ``core`` (begun) over in-memory micro-batches in one process, as one Ray worker drives it over its stream.

    ``on_step(core)`` runs after every optimiser step (the benchmark's clock).
    """
    b, i = core.t.batch_size, 0
    while core.step < core.t.steps:
        if core.micro_step(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) and on_step:
            on_step(core)
        i += 1
    return core


def train_loop_per_worker(config: dict) -> None:
    """The worker function: :class:`TrainCore` over this rank's shard, with checkpoints.

    Ray Train runs it on N workers; one worker runs it in a plain Ray task
    (``config["_reporter"] == "task"``, checkpoints at ``config["_run_loc"]``).
    """
    from synthaug.trainsession import TrainSession

    t: TrainGenConfig = TrainGenConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["train"].items()})
    console.quiet()  # Train's per-report and per-checkpoint lines, unless --verbose
    session = TrainSession(config.get("_reporter", "train"), config.get("_run_loc"), t.use_gpu)
    rank, world, device = session.rank, session.world_size, session.device
    torch.set_num_threads(max(1, int(os.environ.get("SYNTHAUG_TORCH_THREADS", "1"))))
    latent_shape = config.get("latent_shape")
    core = TrainCore(t, config["base_dir"], config["class_names"], config["image_size"], config["channels"],
                     device=device, rank=rank, unconditional=config["unconditional"], moments=latent_shape is not None)

    # Resume from the latest checkpoint (a re-run, or a restarted worker group).
    restored: dict = {}
    ckpt = session.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            restored = core.restore(d)
        if rank == 0:
            print(f"[{config['stage']}] resumed at step {core.step}/{t.steps}")
    start_step = core.step
    core.begin(session.prepare_model if world > 1 else None)

    # This rank's stream, from the micro-batch after the last one the checkpoint consumed.
    micro = t.batch_size // world
    source = train_data.ray_source(config["shards"], config.get("cached"), latent_shape)
    buffer = train_data.shuffle_rows(t, config["shard_rows"], config["channels"], config["image_size"])
    mix = BatchMix(len(config["class_names"]))  # the class mix of the micro-batches this worker trains on
    batches = mix.watch(train_data.stream(source, config["shard_rows"], t.seed, rank, world, micro, buffer,
                                          start=core.step * t.grad_accum), label=lambda b: b[1])
    t0 = time.time()
    track = tracking.StepLogger(config.get("_tracking"), rank)  # rank 0 logs to the driver's run (any node)

    for x, y in batches if core.step < t.steps else ():
        x = torch.from_numpy(x if latent_shape else to_float(x)).to(device)  # (B, C, H, W) in [-1, 1], or moments
        if not core.micro_step(x, torch.from_numpy(y).to(device)):
            continue
        step = core.step
        if track.due(step, t.steps):
            track.log({"loss": core.last_loss, "lr": core.sched.get_last_lr()[0],
                       "images_per_s": core.images * world / max(1e-9, time.time() - t0)}, step)
        if rank == 0 and (step % 50 == 0 or step == t.steps):
            ips = core.images * world / max(1e-9, time.time() - t0)
            print(f"[{config['stage']}] step {step}/{t.steps} loss {core.last_loss:.4f} {ips:.0f} img/s", flush=True)
        if rank == 0 and t.val_grid_every and step % t.val_grid_every == 0:
            unwrapped = dataclasses.replace(core.gen, model=core.raw_model)  # no DDP collectives on one rank
            save_val_grid(unwrapped, core.ema, core.params, storage.join(config["grid_dir"], f"step_{step:06d}.png"))
        if step % t.checkpoint_every == 0 or step == t.steps:
            metrics = {"step": step, "start_step": start_step, **{f"restored_{k}": v for k, v in restored.items()},
                       "loss": core.last_loss, "images_per_s": core.images * world / max(1e-9, time.time() - t0),
                       **mix.summary()}
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    core.save(d)
                    session.report(metrics, d)
            else:
                session.report(metrics)
        if step >= t.steps:
            break
    track.close()


# ----------------------------------------------------------------------------- driver


def _resolve_base(cfg: Config, t: TrainGenConfig, base_dir: str | Path | None) -> str:
    """The base as a checked location ('' for none); hub ids only with ``allow_downloads``."""
    base = str(base_dir or t.base or "")
    return models.resolve_base(base, t.family, cfg.allow_downloads) if base else ""


def _check_base(stage: str, t: TrainGenConfig, base: str, data_dir, class_names, image_size: int, channels: int) -> None:
    """The base fits the data and the config: from its configs alone (no weights are read)."""
    spec = models.LoadSpec(tuple(class_names), image_size, channels, t.prompt_template, t.lora_rank)
    shape, sched = models.probe_base(base, t.family, spec)
    if shape is not None and (shape.image_size != image_size or shape.channels != channels):
        raise models.GeneratorError(
            f"{base}: generator takes {shape.channels}x{shape.image_size}px images, data {data_dir} has "
            f"{channels}x{image_size}px; image size incompatible with the model")
    base_prediction = sched.get("prediction_type", "epsilon")
    if base_prediction != t.prediction_type:
        raise models.GeneratorError(
            f"{base}: the base predicts {base_prediction!r} but config key '{stage}.prediction_type' is "
            f"{t.prediction_type!r}; set it to {base_prediction!r}")


def base_hash(base: str) -> str:
    """A base's content hash: an export's ``weights_hash`` (from its manifest), else the tree's hash."""
    if not base:
        return ""
    if is_complete(base):
        m = read_manifest(base)
        if m.get("weights_hash"):
            return str(m["weights_hash"])
    return hash_tree(base)


def run_key(t: TrainGenConfig, stage: str, data_manifest: dict, base: str, unconditional: bool,
            extra: list[dict] = ()) -> tuple[str, dict]:
    """The content key of a generator training run and the inputs it covers (``synthaug.identity``)."""
    inputs = {"data": data_manifest["content_hash"], "base": base_hash(base)}
    if extra:  # only then: runs on one dataset keep their keys
        inputs["extra"] = [m["content_hash"] for m in extra]
    key = identity.artifact_key(stage, identity.config_fields("train_gen", t), inputs, unconditional=bool(unconditional),
                                class_names=list(data_manifest["class_names"]))
    return key, inputs


def _extra_data(stage: str, t: TrainGenConfig, main: dict, unconditional: bool) -> list[tuple[str, dict]]:
    """``<stage>.extra_data``: (location, manifest) of each, checked against the main dataset."""
    out = []
    for loc in t.extra_data:
        loc = storage.absolute(str(loc))
        m = read_manifest(loc)
        where = f"config key '{stage}.extra_data': {loc}"
        if t.latent_cache:
            raise InputValueError(f"{where}: extra datasets do not go through the latent cache (set {stage}.latent_cache=false)")
        if not unconditional and not m.get("labelled", True):
            raise DatasetError(f"{where}: unlabelled dataset; class-conditional training needs labels")
        if list(m["class_names"]) != list(main["class_names"]):
            raise DatasetError(f"{where}: class names {list(m['class_names'])} differ from {list(main['class_names'])}")
        if list(m["image_size"]) != list(main["image_size"]) or int(m["channels"]) != int(main["channels"]):
            raise DatasetError(f"{where}: images {m['image_size']} x {m['channels']} channels differ from "
                               f"{main['image_size']} x {main['channels']}")
        out.append((loc, m))
    return out


def run(cfg: Config, stage: str, data_dir: str | Path, out_dir: str | Path, storage_dir: str | Path,
        base_dir: str | Path | None = None, unconditional: bool = False, latents_dir: str | None = None) -> dict:
    """Train a generator on a contract dataset and export it (EMA weights) to ``out_dir``.

    ``stage`` picks the config section ('pretrain' or 'finetune'); ``unconditional``
    trains with every label set to the null class (pretraining on an unlabelled pool).
    Every location (data, export, run storage, base) may be local or a URI.
    Everything is checked before training starts.
    """
    from synthaug.raylocal import init_ray

    t: TrainGenConfig = getattr(cfg, stage)
    data_dir = storage.absolute(data_dir)
    data_manifest = read_manifest(data_dir)
    job = _check_inputs(cfg, stage, data_dir, data_manifest, base_dir, unconditional)
    base = job["base"]

    # The content key: the same config and inputs reuse the export, or resume their own run.
    key, inputs = run_key(t, stage, data_manifest, base, unconditional, [m for _, m in job["extra"]])
    out_dir = storage.absolute(str(out_dir))
    done = identity.reuse(out_dir, key, stage, "the export")
    if done is not None:
        return done

    # Resume from where the newest checkpoint of this key's run left off.
    init_ray(cfg.ray)
    storage_dir = storage.absolute(storage_dir)
    name = identity.run_name(stage, key)
    run_dir = storage.join(storage_dir, name)
    offset_steps = latest_step(run_dir)
    if t.latent_cache:  # encode once (or reuse the keyed cache); the stream reads its moments
        job.update(_latent_shards(t, data_dir, data_manifest, base, storage_dir, latents_dir))
    cached = train_data.cache(job["shards"], job["latent_shape"]) if t.cache else None
    loop_config = _loop_config(t, stage, base, unconditional, job, cached, run_dir)
    t0 = time.time()
    if t.num_workers == 1:
        metrics, checkpoint = _fit_task(t, stage, loop_config, run_dir)
    else:
        result = _trainer(t, name, storage_dir, loop_config).fit()
        metrics, checkpoint = result.metrics, result.checkpoint
    seconds = time.time() - t0
    del cached, loop_config
    warn_if_blocked(stage, str(data_dir), metrics)

    # Export the EMA weights in diffusers layout with a manifest (the base's weights are read once, here).
    gen, step = _load_ema(t, stage, base, job, checkpoint)
    identity.write_record(run_dir, stage, key, inputs, to_dict(t))
    if t.val_grid_every:
        tracking.artifacts(storage.join(run_dir, "val_grids"), "val_grids")
    return models.save_generator(gen, out_dir, {
        "stage": stage, "key": key, "inputs": inputs, "run": run_dir, "steps": step, "unconditional": unconditional,
        "base": base, "base_hash": inputs["base"],
        "data_dir": str(data_dir), "data_content_hash": data_manifest["content_hash"],
        "config": to_dict(cfg), "train_seconds": round(seconds, 1),
        "resumed_from": offset_steps,
        "restored_state_sums": {k[len("restored_"):]: v for k, v in metrics.items() if k.startswith("restored_")},
        "final_loss": metrics.get("loss"), "images_per_s": metrics.get("images_per_s"),
        **{k: metrics.get(k) for k in ("batch_blocked_share", "batch_label_entropy")},
    })


def _check_inputs(cfg: Config, stage: str, data_dir: str, data_manifest: dict, base_dir, unconditional: bool) -> dict:
    """Check the data, the base and the sizes before any work: the job's base, classes, image shape, shards, extra sets."""
    t: TrainGenConfig = getattr(cfg, stage)
    class_names = list(data_manifest["class_names"])
    if not class_names:
        raise DatasetError(f"{data_dir}: class count of 0; a generator needs at least one class")
    base = _resolve_base(cfg, t, base_dir)
    image_size, channels = int(data_manifest["image_size"][0]), int(data_manifest["channels"])
    if base:
        _check_base(stage, t, base, data_dir, class_names, image_size, channels)
    else:
        models.new_generator(t.family, t.arch, class_names, image_size, channels)  # raises on bad sizes
    if not data_manifest.get("labelled", True) and not unconditional:
        raise DatasetError(f"{data_dir}: unlabelled dataset; class-conditional training needs labels")
    if t.latent_cache and "vae" not in registry.get(t.family).components:
        raise InputValueError(f"config key '{stage}.latent_cache': family {t.family!r} has no VAE to encode with")
    shards, shard_rows = train_data.shard_locations(data_dir, data_manifest)
    extra = _extra_data(stage, t, data_manifest, unconditional)
    for loc, m in extra:
        more, more_rows = train_data.shard_locations(loc, m)
        shards, shard_rows = shards + more, shard_rows + more_rows
    micro = t.batch_size // t.num_workers
    if train_data.per_epoch(sum(shard_rows), t.num_workers, micro) == 0:
        raise DatasetError(f"{data_dir}: {sum(shard_rows)} rows, fewer than one micro-batch of {micro} for each of "
                           f"{t.num_workers} workers (config keys '{stage}.batch_size', '{stage}.num_workers')")
    return {"base": base, "class_names": class_names, "image_size": image_size, "channels": channels, "shards": shards,
            "shard_rows": shard_rows, "extra": extra, "latent_shape": None}


def _latent_shards(t: TrainGenConfig, data_dir: str, data_manifest: dict, base: str | None, storage_dir: str,
                   latents_dir: str | None) -> dict:
    """The keyed latent cache (built, or reused) as the stream's shards, and its latent shape."""
    ckey = latent_cache.cache_key(data_manifest, base, t.hflip)
    loc = storage.absolute(latents_dir or storage.join(storage.parent(storage_dir), "latents", ckey[0][:12]))
    lm = latent_cache.build(data_dir, base, loc, hflip=t.hflip, use_gpu=t.use_gpu, key=ckey)
    shards, shard_rows = train_data.shard_locations(loc, lm)
    return {"shards": shards, "shard_rows": shard_rows, "latent_shape": lm["latent_shape"]}


def _loop_config(t: TrainGenConfig, stage: str, base: str | None, unconditional: bool, job: dict, cached,
                 run_dir: str) -> dict:
    """What ``train_loop_per_worker`` reads (the run's config, data and where its grids go)."""
    return {
        "train": to_dict(t), "stage": stage, "base_dir": base, "class_names": job["class_names"],
        "image_size": job["image_size"], "channels": job["channels"], "unconditional": unconditional,
        "shards": job["shards"], "shard_rows": job["shard_rows"], "cached": cached,
        "latent_shape": job["latent_shape"], "grid_dir": storage.join(run_dir, "val_grids"),
        "_tracking": tracking.handle(),
    }


def _fit_task(t: TrainGenConfig, stage: str, config: dict, run_dir: str):
    """One worker: the loop in one Ray task (``trainsession.run_task``), checkpoints at the run's location.

    As the classifier's one worker does (``classify.train``): no Train controller, worker
    group or process group to start. A task whose process or node dies is run again
    (``<stage>.max_failures`` times) and resumes from the latest checkpoint; so does a re-run.
    Returns the last checkpoint's metrics and the checkpoint.
    """
    from synthaug.trainsession import run_task

    _, store = run_task(train_loop_per_worker, config, run_dir, name=stage, num_cpus=1, use_gpu=t.use_gpu,
                        max_retries=t.max_failures)
    return store.latest_metrics(), store.latest_checkpoint()


def _trainer(t: TrainGenConfig, name: str, storage_dir: str, config: dict):
    """The Ray Train ``TorchTrainer`` of this key's run, N workers (its name and storage make a re-run resume)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=name, **storage.ray_storage(storage_dir),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=console.train_logging(),
        ),
    )


def _load_ema(t: TrainGenConfig, stage: str, base: str | None, job: dict, checkpoint):
    """The generator with the final checkpoint's EMA weights, and its step (which must be ``t.steps``)."""
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        step = json.loads(Path(d, STATE_FILE).read_text())["step"]
        gen = _load(t, base, job["class_names"], job["image_size"], job["channels"])
        shadow = load_file(os.path.join(d, "ema.safetensors"))
        params = trainable(gen.model)
        if len(params) != len(shadow):
            raise RuntimeError(f"{stage}: checkpoint holds {len(shadow)} EMA tensors, the model trains {len(params)}")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(shadow[str(i)])
    if step != t.steps:
        raise RuntimeError(f"{stage}: finished at step {step}, expected {t.steps}")
    return gen, step
