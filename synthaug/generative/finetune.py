"""Generator training with Ray Train (DDP): class-conditional fine-tuning, and pretraining.

Pretraining on an unlabelled pool is the same loop with every label set to the null
class. One function, :func:`train_loop_per_worker`, runs for 1 and for N workers, for
every generator family: the loss encodes images through the family (identity for
``unet``, a frozen VAE for ``dit`` and ``text2image``), and only parameters that require
grad (all, or LoRA adapters) are optimised and tracked by the EMA. Its step is
:class:`TrainCore`, plain PyTorch without Ray, which the throughput benchmark's plain
loop and the tests drive directly.

Data: the driver turns the contract dataset into a *step plan* -- seeded permutations
of the rows, concatenated until ``steps x batch x grad_accum`` rows -- and streams it
through Ray Data, decoded in ``map_batches``. Checkpoints (rank 0, every N steps)
hold model, EMA, optimiser, LR schedule, step and RNG state; a re-run of the same
command resumes from the latest one (Train V2 finds it in the run's storage), and
a restarted worker group skips the plan rows already consumed, so the final step
count is exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from synthaug.artifacts import DatasetError, read_manifest, read_table, hash_tree
from synthaug.config import Config, TrainGenConfig, to_dict
from synthaug.data.images import decode_batch, to_float
from synthaug.generative import models
from synthaug.generative.diffusion import diffusion_loss, lr_lambda

STATE_FILE = "train_state.json"


# ----------------------------------------------------------------------------- data plan


def step_plan(num_rows: int, rows_needed: int, seed: int, offset: int = 0) -> np.ndarray:
    """Row indices for the whole run: seeded permutations, concatenated, from ``offset``."""
    epochs = (offset + rows_needed) // num_rows + 1
    idx = np.concatenate([np.random.default_rng([seed, e]).permutation(num_rows) for e in range(epochs)])
    return idx[offset : offset + rows_needed]


def plan_rows(table: pa.Table, t: TrainGenConfig, offset_steps: int = 0) -> pa.Table:
    """The rows a run from optimiser step ``offset_steps`` reads, in order (plus one spare batch)."""
    per_step = t.batch_size * t.grad_accum
    rows_needed = max(0, t.steps - offset_steps) * per_step + t.batch_size
    return table.take(pa.array(step_plan(table.num_rows, rows_needed, t.seed, offset_steps * per_step)))


def _decode(batch: dict) -> dict:
    """Ray Data map_batches: PNG bytes -> float32 (B, C, H, W) in [-1, 1] and int64 labels."""
    return {"x": to_float(decode_batch(batch["image"])), "y": np.asarray(batch["label"], dtype=np.int64)}


def latest_step(storage: Path) -> int:
    """The step of the checkpoint Ray Train will resume from (0 when none).

    Read from Train V2's checkpoint-manager snapshot, not from the newest directory: a
    checkpoint written but not yet registered when a run died is not resumed from.
    """
    snap = storage / "checkpoint_manager_snapshot.json"
    if snap.is_file():
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        return int(latest.get("metrics", {}).get("step", 0))
    steps = [json.loads(p.read_text())["step"] for p in storage.rglob(STATE_FILE)] if storage.exists() else []
    return max(steps, default=0)


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


def save_val_grid(gen, ema, params, path: Path, steps: int = 20, guidance_scale: float = 2.0) -> None:
    """One image per class (seed = class index) from the EMA weights, as a PNG row."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).resize((row.shape[1] * 4, row.shape[0] * 4), Image.Resampling.NEAREST).save(path)


def _load(t: TrainGenConfig, base: str, class_names: list[str], image_size: int, channels: int) -> models.Generator:
    """The generator to train: loaded from ``base`` for the data's image size, or new from ``t.arch``."""
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
    :meth:`micro_step` runs one micro-batch. A plain loop that feeds it the step plan's
    batches (``plan_rows``) computes what a 1-worker Ray Train run computes.
    """

    def __init__(self, t: TrainGenConfig, base: str, class_names: list[str], image_size: int, channels: int, *,
                 device: torch.device | str = "cpu", rank: int = 0, unconditional: bool = False):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.t, self.rank, self.unconditional = t, rank, unconditional
        self.device = torch.device(device)
        torch.manual_seed(t.seed)
        self.gen = _load(t, base, class_names, image_size, channels)
        self.noise_sched = DDPMScheduler.from_config(self.gen.scheduler_config)
        self.raw_model = self.gen.to(self.device).model  # frozen parts (VAE, text encoder) go to the device too
        self.params = trainable(self.raw_model)
        self.ema = EMAModel(self.params, decay=t.ema_decay)
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t.warmup_steps, t.steps))
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
        """One micro-batch: pixels (B, C, H, W) in [-1, 1], labels (B,). True when it completed an optimiser step."""
        t, null = self.t, self.gen.null_class
        if self.unconditional:
            y = torch.full_like(y, null)
        elif t.label_dropout > 0:  # label dropout to the null class, for CFG
            drop = torch.rand(y.shape, generator=self.rng).to(y.device) < t.label_dropout
            y = torch.where(drop, torch.full_like(y, null), y)
        if t.hflip:
            flip = (torch.rand(x.shape[0], generator=self.rng) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = diffusion_loss(self.gen, x, y, self.noise_sched, prediction_type=t.prediction_type,
                                  min_snr_gamma=t.min_snr_gamma, generator=None)
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
    """A run's whole step plan decoded in memory: pixels (N, C, H, W) in [-1, 1] and labels (N,), in plan order."""
    plan = plan_rows(read_table(data_dir, columns=["image", "label"]), t)
    dec = _decode({"image": plan.column("image").to_pylist(), "label": np.asarray(plan.column("label"))})
    return torch.from_numpy(dec["x"]), torch.from_numpy(dec["y"])


def plain_loop(core: TrainCore, x: torch.Tensor, y: torch.Tensor, on_step=None) -> TrainCore:
    """Drive ``core`` (begun) over in-memory plan tensors in one process, as one Ray worker drives it over its shard.

    ``on_step(core)`` runs after every optimiser step (the benchmark's clock).
    """
    b, i = core.t.batch_size, 0
    while core.step < core.t.steps:
        if core.micro_step(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) and on_step:
            on_step(core)
        i += 1
    return core


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (1 or N workers): :class:`TrainCore` over this rank's shard, with checkpoints."""
    import ray.train
    import ray.train.torch

    t: TrainGenConfig = TrainGenConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["train"].items()})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("SYNTHAUG_TORCH_THREADS", "1"))))
    device = ray.train.torch.get_device()
    core = TrainCore(t, config["base_dir"], config["class_names"], config["image_size"], config["channels"],
                     device=device, rank=rank, unconditional=config["unconditional"])

    # Resume from the latest checkpoint (a re-run, or a restarted worker group).
    restored: dict = {}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            restored = core.restore(d)
        if rank == 0:
            print(f"[{config['stage']}] resumed at step {core.step}/{t.steps}")
    start_step = core.step
    core.begin(ray.train.torch.prepare_model if world > 1 else None)

    micro = t.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    skip = (core.step - config["plan_offset"]) * t.grad_accum  # plan batches already consumed
    t0 = time.time()

    while core.step < t.steps:
        for batch in shard.iter_torch_batches(batch_size=micro, drop_last=True, device=device):
            if skip > 0:
                skip -= 1
                continue
            if not core.micro_step(batch["x"], batch["y"]):
                continue
            step = core.step
            if rank == 0 and (step % 50 == 0 or step == t.steps):
                ips = core.images * world / max(1e-9, time.time() - t0)
                print(f"[{config['stage']}] step {step}/{t.steps} loss {core.last_loss:.4f} {ips:.0f} img/s", flush=True)
            if rank == 0 and t.val_grid_every and step % t.val_grid_every == 0:
                unwrapped = dataclasses.replace(core.gen, model=core.raw_model)  # no DDP collectives on one rank
                save_val_grid(unwrapped, core.ema, core.params, Path(config["grid_dir"]) / f"step_{step:06d}.png")
            if step % t.checkpoint_every == 0 or step == t.steps:
                metrics = {"step": step, "start_step": start_step, **{f"restored_{k}": v for k, v in restored.items()},
                           "loss": core.last_loss, "images_per_s": core.images * world / max(1e-9, time.time() - t0)}
                if rank == 0:
                    with tempfile.TemporaryDirectory() as d:
                        core.save(d)
                        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report(metrics)
            if step >= t.steps:
                break


# ----------------------------------------------------------------------------- driver


def _resolve_base(cfg: Config, t: TrainGenConfig, base_dir: str | Path | None) -> str:
    """The base as a checked local directory ('' for none); hub ids only with ``allow_downloads``."""
    base = str(base_dir or t.base or "")
    # Absolute: workers run in their own directories.
    return str(models.resolve_base(base, t.family, cfg.allow_downloads).absolute()) if base else ""


def run(cfg: Config, stage: str, data_dir: str | Path, out_dir: str | Path, storage_dir: str | Path,
        base_dir: str | Path | None = None, unconditional: bool = False) -> dict:
    """Train a generator on a contract dataset and export it (EMA weights) to ``out_dir``.

    ``stage`` picks the config section ('pretrain' or 'finetune'); ``unconditional``
    trains with every label set to the null class (pretraining on an unlabelled pool).
    Everything is checked before Ray Train starts.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from synthaug.raylocal import init_ray

    t: TrainGenConfig = getattr(cfg, stage)
    data_manifest = read_manifest(data_dir)
    class_names = list(data_manifest["class_names"])
    if not class_names:
        raise DatasetError(f"{data_dir}: class count of 0; a generator needs at least one class")
    base = _resolve_base(cfg, t, base_dir)
    image_size, channels = int(data_manifest["image_size"][0]), int(data_manifest["channels"])
    if base:
        probe = _load(t, base, class_names, image_size, channels)
        if probe.image_size != image_size or probe.channels != channels:
            raise models.GeneratorError(
                f"{base}: generator takes {probe.channels}x{probe.image_size}px images, data {data_dir} has "
                f"{channels}x{image_size}px; image size incompatible with the model")
        base_prediction = probe.scheduler_config.get("prediction_type", "epsilon")
        if base_prediction != t.prediction_type:
            raise models.GeneratorError(
                f"{base}: the base predicts {base_prediction!r} but config key '{stage}.prediction_type' is "
                f"{t.prediction_type!r}; set it to {base_prediction!r}")
        del probe
    else:
        models.new_generator(t.family, t.arch, class_names, image_size, channels)  # raises on bad sizes
    if not data_manifest.get("labelled", True) and not unconditional:
        raise DatasetError(f"{data_dir}: unlabelled dataset; class-conditional training needs labels")

    # Step plan, from where the newest checkpoint left off.
    init_ray(cfg.ray)
    storage = Path(storage_dir).absolute()
    offset_steps = latest_step(storage / stage)
    plan = plan_rows(read_table(data_dir, columns=["image", "label"]), t, offset_steps)
    import ray.data

    ds = ray.data.from_arrow(plan).map_batches(_decode, batch_format="numpy")

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": to_dict(t), "stage": stage, "base_dir": base, "class_names": class_names,
            "image_size": image_size, "channels": channels, "unconditional": unconditional,
            "plan_offset": offset_steps, "grid_dir": str(storage / stage / "val_grids"),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=stage, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )
    t0 = time.time()
    result = trainer.fit()
    seconds = time.time() - t0

    # Export the EMA weights in diffusers layout with a manifest.
    with result.checkpoint.as_directory() as d:
        step = json.loads(Path(d, STATE_FILE).read_text())["step"]
        gen = _load(t, base, class_names, image_size, channels)
        from safetensors.torch import load_file

        shadow = load_file(os.path.join(d, "ema.safetensors"))
        params = trainable(gen.model)
        if len(params) != len(shadow):
            raise RuntimeError(f"{stage}: checkpoint holds {len(shadow)} EMA tensors, the model trains {len(params)}")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(shadow[str(i)])
    if step != t.steps:
        raise RuntimeError(f"{stage}: finished at step {step}, expected {t.steps}")
    return models.save_generator(gen, out_dir, {
        "stage": stage, "steps": step, "unconditional": unconditional,
        "base": base, "base_hash": hash_tree(base) if base else "",
        "data_dir": str(data_dir), "data_content_hash": data_manifest["content_hash"],
        "config": to_dict(cfg), "train_seconds": round(seconds, 1),
        "resumed_from": offset_steps,
        "restored_state_sums": {k[len("restored_"):]: v for k, v in result.metrics.items() if k.startswith("restored_")},
        "final_loss": result.metrics.get("loss"), "images_per_s": result.metrics.get("images_per_s"),
    })
