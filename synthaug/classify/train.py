"""Classifier training: a plain-PyTorch core, one per-worker loop, and two ways to run it.

* ``train_epoch`` / ``evaluate`` are plain PyTorch (no Ray), testable and benchmarkable alone.
* ``train_loop_per_worker(config)`` is the one training function. Ray Train runs it on 1
  or N workers (DDP through ``ray.train.torch.prepare_model``); a Ray Tune trial runs it
  directly in its own process. The loop talks to whichever through a small ``_Session``
  picked by ``config["_reporter"]``: ``"train"`` (``ray.train.*``), ``"tune"``
  (``ray.tune.*``, as Ray 2.x requires inside a Tune function) or ``"local"`` (no Ray
  session: reports are only returned).
* ``fit`` builds a ``TorchTrainer``; ``fit_local`` calls the loop in this process.

The train set arrives as a Ray Dataset whose PNG decoding and float conversion already
happened in ``map_batches``; the loop only iterates ``iter_torch_batches``. The real val
split is small and is held in memory by rank 0, which evaluates after every epoch.

Checkpoints (rank 0 only) are a directory with ``model.safetensors`` (the unwrapped
model's state), ``state.pt`` (optimizer, scheduler, epoch, elapsed seconds: tensors and
plain containers, loadable with ``torch.load(weights_only=True)``) and ``classifier.json``.
A run resumes from the latest one: ``fit`` with the same name and storage (Train V2
restores the run from its storage), or a restored Tune trial.

Randomness is derived from (seed, epoch, rank): weight init from the seed, dropout,
augmentation and shuffling from (seed, epoch, rank), so a resumed run replays the same
epochs as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from synthaug.config import ClassifyConfig, RayConfig
from synthaug.classify.models import check_model_name, create_classifier, save_classifier
from synthaug.data.images import decode_batch, decode_png, to_float

WARMUP_FRACTION = 0.05  # of all optimiser steps; linear warm-up before the cosine decay
MIN_LR_FACTOR = 0.01  # cosine floor, as a fraction of the peak lr
RESULT_KEYS = (
    "top1", "top5", "train_loss", "images_per_s", "epochs", "seconds", "n_train", "start_epoch", "per_class_top1",
)


# ----------------------------------------------------------------------------- compute core


def shift_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by a random -1, 0 or +1 pixel in x and y (edges replicated)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")  # (B, C, H+2, W+2)
    dy = torch.randint(0, 3, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 3, (b,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    device: torch.device | str,
    *,
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> dict:
    """One pass over ``batches`` ({"image": (B, C, H, W) float, "label": (B,)}); scheduler steps per batch.

    Returns ``{"train_loss", "images", "seconds"}`` for the batches this process saw.
    """
    model.train()
    loss_sum, n, t0 = 0.0, 0, time.perf_counter()
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if augment:
            x = shift_augment(x, generator)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += float(loss.detach()) * len(y)
        n += len(y)
    return {"train_loss": loss_sum / max(n, 1), "images": n, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, images_float, labels, batch_size: int = 512, num_classes: int | None = None) -> dict:
    """Top-1 / top-5 accuracy in % (top-k capped at the class count) and per-class top-1 (NaN if absent)."""
    x_all = torch.as_tensor(images_float, dtype=torch.float32)  # (N, C, H, W)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (N,)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = torch.cat([model(x_all[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x_all), batch_size)])
    model.train(was_training)
    k = num_classes or logits.shape[1]
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    hit1 = topk[:, 0] == y_all
    hit5 = (topk == y_all[:, None]).any(dim=1)
    per_class = []
    for c in range(k):
        mask = y_all == c
        per_class.append(float(hit1[mask].float().mean() * 100) if mask.any() else float("nan"))
    return {"top1": float(hit1.float().mean() * 100), "top5": float(hit5.float().mean() * 100), "per_class_top1": per_class}


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """LambdaLR: linear warm-up, then cosine to MIN_LR_FACTOR x peak.

    A torch LambdaLR rather than timm's scheduler: its state is only the step count, so a
    run resumed with more epochs continues on the new, longer schedule (timm's scheduler
    state carries its horizon and would restore the old one).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, cfg: ClassifyConfig) -> torch.optim.Optimizer:
    """AdamW through timm (no weight decay on biases and norm parameters)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)


def _seed(seed: int, *salt: int) -> int:
    return int(np.random.SeedSequence([int(seed), *salt]).generate_state(1)[0])


# ----------------------------------------------------------------------------- data


def decode_to_float(batch: dict) -> dict:
    """Ray Data ``map_batches`` fn: PNG bytes -> float32 (B, C, H, W) in [-1, 1]; labels int64."""
    return {"image": to_float(decode_batch(batch["image"])), "label": np.asarray(batch["label"], dtype=np.int64)}


def training_dataset(table: pa.Table):
    """The train table as a decoded, materialised Ray Dataset (decoding once, not per epoch)."""
    import ray.data

    ds = ray.data.from_arrow(table.select(["image", "label"]))
    return ds.map_batches(decode_to_float, batch_format="numpy", batch_size=256).materialize()


def load_val(val_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    from synthaug.artifacts import read_table

    val = read_table(val_dir, columns=["image", "label"])
    return to_float(decode_batch(val.column("image").to_pylist())), np.asarray(val.column("label").to_pylist())


# ----------------------------------------------------------------------------- session


class _Session:
    """Data, checkpoints and reports for the loop: a Ray Train worker, a Tune trial, or local."""

    def __init__(self, config: dict):
        self.kind = config.get("_reporter", "train")
        if self.kind not in ("train", "tune", "local"):
            raise ValueError(f"_reporter must be 'train', 'tune' or 'local', got {self.kind!r}")
        self.config = config
        if self.kind == "train":
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
        else:
            self.rank, self.world_size = 0, 1
            use_gpu = config["classify"].use_gpu and torch.cuda.is_available()
            self.device = torch.device("cuda" if use_gpu else "cpu")

    def train_data(self):
        if self.kind == "train":
            import ray.train

            return ray.train.get_dataset_shard("train")
        return self.config["_dataset"].iterator()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.kind == "train":
            import ray.train.torch

            return ray.train.torch.prepare_model(model)  # to device, DDP when world_size > 1
        return model.to(self.device)

    def get_checkpoint(self):
        if self.kind == "train":
            import ray.train

            return ray.train.get_checkpoint()
        if self.kind == "tune":
            import ray.tune

            return ray.tune.get_checkpoint()
        return None

    @property
    def saves_checkpoints(self) -> bool:
        return self.kind != "local" and self.rank == 0

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if self.kind == "train":
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
        elif self.kind == "tune":
            import ray.tune

            ckpt = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.tune.report(metrics, checkpoint=ckpt)


def _take(data, steps: int, kwargs: dict):
    """Exactly ``steps`` batches: passes over the shard (each reshuffled) until the count is met."""
    done, passes = 0, 0
    while done < steps:
        kw = dict(kwargs, local_shuffle_seed=(kwargs["local_shuffle_seed"] + passes) % (2**31))
        got = 0
        for batch in data.iter_torch_batches(**kw):
            yield batch
            done, got = done + 1, got + 1
            if done >= steps:
                return
        if got == 0:
            return
        passes += 1


def _all_reduce_sum(values: list[float]) -> list[float]:
    """Sum across DDP ranks (identity on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _write_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, epoch: int, seconds: float, meta: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": torch.tensor(epoch),
        "seconds": torch.tensor(seconds, dtype=torch.float64),
    }
    torch.save(state, path / "state.pt")
    (path / "classifier.json").write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> dict:
    """Train ``config["classify"].model``; report per epoch; return rank 0's last metrics.

    Config keys: ``classify`` (ClassifyConfig), ``seed``, ``num_classes``, ``in_chans``,
    ``class_names``, ``image_size``, ``val_dir``, ``n_train``, ``_reporter`` and, outside
    Ray Train, ``_dataset`` (the decoded Ray Dataset).
    """
    cfg: ClassifyConfig = config["classify"]
    seed, num_classes = int(config["seed"]), int(config["num_classes"])
    session = _Session(config)
    if session.kind != "local":
        torch.set_num_threads(1)  # one core per worker; Ray packs workers onto few cores
    rank, world = session.rank, session.world_size
    meta = classifier_meta(cfg, config["class_names"], config["in_chans"], config["image_size"])

    # Build the model (same init on every rank), restore, then wrap.
    torch.manual_seed(seed)
    model = create_classifier(cfg.model, num_classes, config["in_chans"])
    start_epoch, elapsed, state = 0, 0.0, None
    ckpt = session.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        start_epoch, elapsed = int(state["epoch"]), float(state["seconds"])
    model = session.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model

    # Optimiser and schedule over the whole run (also when resuming with more epochs).
    per_worker_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, math.ceil((int(config["epoch_images"]) // world) / per_worker_batch))
    total = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(bare, cfg)
    scheduler = cosine_with_warmup(optimizer, total, max(1, round(WARMUP_FRACTION * total)))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * f(scheduler.last_epoch)  # the new schedule's lr at the restored step
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    val_x, val_y = load_val(config["val_dir"]) if rank == 0 else (None, None)

    data = session.train_data()
    last: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(_seed(seed, epoch, rank, 1))  # dropout
        gen = torch.Generator().manual_seed(_seed(seed, epoch, rank, 2))  # augmentation
        stats = train_epoch(model, _take(data, steps_per_epoch, dict(
            batch_size=per_worker_batch,
            dtypes={"image": torch.float32, "label": torch.int64},
            device=session.device,
            local_shuffle_buffer_size=max(256, 8 * per_worker_batch),
            local_shuffle_seed=_seed(seed, epoch, rank, 3) % (2**31),
        )), optimizer, scheduler, loss_fn, session.device, augment=cfg.augment, generator=gen)
        loss_sum, images = _all_reduce_sum([stats["train_loss"] * stats["images"], float(stats["images"])])
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(images, 1.0)}
        if rank != 0:
            session.report(metrics, None)
            continue
        metrics.update(evaluate(bare, val_x, val_y, num_classes=num_classes))
        elapsed += time.perf_counter() - t0
        metrics.update({
            "epochs": epoch + 1, "images_per_s": images / max(stats["seconds"], 1e-9), "seconds": elapsed,
            "n_train": int(config["n_train"]), "start_epoch": start_epoch,
        })
        due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        if session.saves_checkpoints and due:  # a checkpoint costs ~1 s through Ray; not every epoch
            with tempfile.TemporaryDirectory() as d:
                _write_checkpoint(Path(d), bare, optimizer, scheduler, epoch + 1, elapsed, meta)
                session.report(metrics, d)
        else:
            session.report(metrics, None)
        last = metrics
    return last


# ----------------------------------------------------------------------------- drivers


def classifier_meta(cfg: ClassifyConfig, class_names: list[str], in_chans: int, image_size) -> dict:
    """What ``load_classifier`` needs to rebuild the model."""
    return {
        "model": cfg.model, "num_classes": len(class_names), "in_chans": int(in_chans),
        "class_names": list(class_names), "image_size": list(image_size),
    }


def _loop_config(cfg, train, val_dir, seed, class_names, in_chans, reporter) -> dict:
    if train.num_rows == 0:
        raise ValueError("train set is empty")
    check_model_name(cfg.model)  # fail before any worker starts, with close names
    # One epoch = epoch_images images, by default the real rows: a 1:3 mix then gets the same
    # optimiser steps as real-only, so a ratio's effect is not a training-length effect.
    n_real = sum(1 for s in train.column("source").to_pylist() if s == "real") if "source" in train.column_names else 0
    epoch_images = cfg.epoch_images or n_real or train.num_rows
    return {
        "epoch_images": int(epoch_images),
        "classify": cfg, "seed": int(seed), "num_classes": len(class_names), "in_chans": int(in_chans),
        "class_names": list(class_names), "image_size": list(decode_png(train.column("image")[0].as_py()).shape[:2]),
        "val_dir": str(Path(val_dir).resolve()), "n_train": train.num_rows, "_reporter": reporter,
    }


def _result(metrics: dict | None) -> dict:
    if not metrics:
        raise RuntimeError("training reported no metrics")
    return {k: metrics[k] for k in RESULT_KEYS}


def fit(
    cfg: ClassifyConfig,
    train: pa.Table,
    val_dir: str | Path,
    *,
    seed: int,
    out_dir: str | Path,
    name: str,
    class_names: list[str],
    in_chans: int,
    ray_cfg: RayConfig | None = None,
    save_model: bool = False,
    callbacks: list | None = None,
) -> dict:
    """Train with Ray Train (``cfg.num_workers`` DDP workers); returns the final epoch's flat metrics.

    The run lives in ``out_dir/name``; calling again with the same name and storage resumes
    from its latest checkpoint (more ``epochs`` continue training). With ``save_model`` the
    final model is saved to ``out_dir/model`` for ``load_classifier``. ``callbacks`` go to
    ``RunConfig`` (a Tune trial passes ``TuneReportCallback`` to forward each epoch).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from synthaug.raylocal import init_ray

    config = _loop_config(cfg, train, val_dir, seed, class_names, in_chans, "train")
    init_ray(ray_cfg)
    out_dir = Path(out_dir).resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(out_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
        ),
        datasets={"train": training_dataset(train)},
    )
    result = trainer.fit()
    metrics = _result(result.metrics)
    if save_model:
        meta = classifier_meta(cfg, class_names, in_chans, config["image_size"])
        model = create_classifier(cfg.model, len(class_names), in_chans)
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
        save_classifier(model, out_dir / "model", meta)
    return metrics


def fit_local(
    cfg: ClassifyConfig,
    train: pa.Table,
    val_dir: str | Path,
    *,
    seed: int,
    class_names: list[str],
    in_chans: int,
    reporter: str = "tune",
    ray_cfg: RayConfig | None = None,
) -> dict:
    """Run ``train_loop_per_worker`` in this process (a Tune trial: ``reporter="tune"``).

    Ray's advice for Tune: call the training function directly for one worker, and build
    a ``TorchTrainer`` inside the trial (``fit``) for more. ``reporter="local"`` runs
    without a Tune session (no checkpoints). The decoded train set is a Ray Dataset, so
    Ray is started (``init_ray``) when it is not running.
    """
    if cfg.num_workers != 1:
        raise ValueError(f"fit_local runs one worker; classify.num_workers={cfg.num_workers} needs fit()")
    from synthaug.raylocal import init_ray

    config = _loop_config(cfg, train, val_dir, seed, class_names, in_chans, reporter)
    init_ray(ray_cfg)  # a no-op inside a Tune trial, where Ray is already up
    config["_dataset"] = training_dataset(train)
    return _result(train_loop_per_worker(config))
