"""Classifier training: a plain-PyTorch core, one per-worker loop, and two ways to run it.

* ``train_epoch`` / ``evaluate`` are plain PyTorch (no Ray), testable and benchmarkable alone.
* ``train_loop_per_worker(config)`` is the one training function. Ray Train runs it on 1
  or N workers (DDP through ``ray.train.torch.prepare_model``); a Ray Tune trial runs it
  directly in its own process. The loop talks to whichever through a small ``_Session``
  picked by ``config["_reporter"]``: ``"train"`` (``ray.train.*``), ``"tune"``
  (``ray.tune.*``, as Ray 2.x requires inside a Tune function) or ``"local"`` (no Ray
  session: reports are only returned).
* ``fit`` builds a ``TorchTrainer``; ``fit_local`` calls the loop in this process.

timm supplies the recipe's pieces: the model (``create_model``), ``create_transform``
augmentation (RandAugment, random erasing; see ``augment.py``), Mixup / CutMix with label
smoothing, ``ModelEmaV3``, ``create_optimizer_v2`` and ``create_scheduler_v2`` (cosine
with warm-up, stepped per update). bf16 autocast and channels_last apply on GPU.

Data: the train set is a Ray Dataset decoded once to uint8 and materialised; each epoch
the loop iterates its shard with ``iter_torch_batches(collate_fn=TrainCollate)``, so the
augmentation runs in Ray Data's prefetch thread, off the loop's critical path. The real
val split is small and is held in memory by rank 0, which evaluates after every epoch.

Checkpoints (rank 0 only) are a directory with ``model.safetensors`` (the unwrapped
model's state), ``ema.safetensors`` (with ``model_ema``), ``state.pt`` (optimizer state,
epoch, update count, elapsed seconds: tensors and plain containers, loadable with
``torch.load(weights_only=True)``) and ``classifier.json``. A run resumes from the latest
one: ``fit`` with the same name and storage (Train V2 restores the run from its storage),
or a restored Tune trial. The learning rate is a pure function of the update count, so a
run resumed with more epochs continues on the new, longer schedule.

Randomness: weight init from the seed; dropout and Mixup from (seed, epoch, rank / step);
augmentation per sample from (seed, epoch, row id); shuffling from (seed, epoch, rank). A
resumed run replays the same epochs as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from synthaug.config import ClassifyConfig, RayConfig, replace
from synthaug.classify.augment import MixupCutmix, TrainCollate, _seed, enabled as mixup_enabled
from synthaug.classify.domain import has_domain_bn, set_domain
from synthaug.classify.models import build_classifier, check_classifier_config, save_classifier
from synthaug.data.images import decode_batch, decode_png, to_float

RESULT_KEYS = (
    "top1", "top5", "top1_no_ema", "train_loss", "images_per_s", "epochs", "seconds", "n_train", "start_epoch",
    "per_class_top1",
)


# ----------------------------------------------------------------------------- compute core


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    device: torch.device | str,
    *,
    step: int = 0,
    seed: int = 0,
    mixup: MixupCutmix | None = None,
    ema: Any = None,
    amp: bool = False,
    channels_last: bool = False,
) -> dict:
    """One pass over ``batches`` ({"image": (B, C, H, W) float, "label": (B,), "domain": (B,) bool}).

    ``step`` is the global update count so far: the timm scheduler is stepped per update
    (``step_update``), Mixup is seeded from (seed, step), and the EMA is updated after each
    optimiser step. Returns ``{"train_loss", "images", "seconds", "step"}`` for this process.
    """
    model.train()
    bare = model.module if hasattr(model, "module") else model
    split_bn = has_domain_bn(bare)
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    fmt = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    loss_sum, n, t0 = 0.0, 0, time.perf_counter()
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True).to(memory_format=fmt)  # (B, C, H, W)
        y = batch["label"].to(device, non_blocking=True)  # (B,)
        domain = batch.get("domain")
        target = y
        if mixup is not None:
            keep = len(y) - len(y) % 2  # timm's Mixup pairs a batch with its reverse: even sizes only
            x, y = x[:keep], y[:keep]
            domain = domain[:keep] if domain is not None else None
            if keep == 0:
                continue
            x, target = mixup(x, y, seed=_seed(seed, step))
        if split_bn:
            set_domain(bare, domain.to(device) if domain is not None else None)
        with autocast:
            loss = loss_fn(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if scheduler is not None:
            scheduler.step_update(num_updates=step)
        if ema is not None:
            ema.update(bare, step=step)
        loss_sum += float(loss.detach()) * len(y)
        n += len(y)
    if split_bn:
        set_domain(bare, None)
    return {"train_loss": loss_sum / max(n, 1), "images": n, "seconds": time.perf_counter() - t0, "step": step}


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


def build_optimizer(model: nn.Module, cfg: ClassifyConfig) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` (no weight decay on biases and norm parameters)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ClassifyConfig, steps_per_epoch: int):
    """timm ``create_scheduler_v2``: linear warm-up then cosine to ``min_lr_factor x lr``, stepped per update.

    Its lr is a function of the update count alone (``step_update``), which is what makes
    resuming -- also with more epochs -- exact without restoring scheduler state.
    """
    from timm.scheduler import create_scheduler_v2

    floor = cfg.lr * cfg.min_lr_factor
    warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=floor, warmup_lr=floor, warmup_epochs=warmup,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def build_loss(cfg: ClassifyConfig) -> nn.Module:
    """Soft-target cross-entropy under Mixup/CutMix (its targets carry the smoothing), else smoothed CE."""
    if mixup_enabled(cfg):
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


# ----------------------------------------------------------------------------- data


def decode_to_uint8(batch: dict) -> dict:
    """Ray Data ``map_batches`` fn: PNG bytes -> uint8 (B, C, H, W); labels, domain (True = synthetic), row."""
    return {
        "image": decode_batch(batch["image"]),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "domain": np.asarray(batch["source"]) == "synthetic",
        "row": np.asarray(batch["row"], dtype=np.int64),
    }


def _with_row_and_source(table: pa.Table) -> pa.Table:
    """image, label, source ('real' when absent) and a stable row number (the per-sample seed's key)."""
    source = table.column("source") if "source" in table.column_names else pa.array(["real"] * table.num_rows)
    return pa.table({"image": table.column("image"), "label": table.column("label"), "source": source,
                     "row": pa.array(np.arange(table.num_rows, dtype=np.int64))})


def training_dataset(table: pa.Table):
    """The train table as a Ray Dataset decoded once to uint8 and materialised (augmented per epoch)."""
    import ray.data

    ds = ray.data.from_arrow(_with_row_and_source(table))
    return ds.map_batches(decode_to_uint8, batch_format="numpy", batch_size=256).materialize()


def load_val(val_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    from synthaug.artifacts import read_table

    val = read_table(val_dir, columns=["image", "label"])
    return to_float(decode_batch(val.column("image").to_pylist())), np.asarray(val.column("label").to_pylist())


def iterate(data, steps: int, cfg: ClassifyConfig, *, batch_size: int, seed: int, epoch: int, rank: int,
            in_chans: int, image_size) -> Iterable[dict]:
    """``steps`` batches of one epoch from a Ray Data shard or dataset, augmented by ``TrainCollate``."""
    return _take(data, steps, dict(
        batch_size=batch_size,
        collate_fn=TrainCollate(cfg, in_chans, image_size, seed, epoch),
        local_shuffle_buffer_size=max(256, 8 * batch_size),
        local_shuffle_seed=_seed(seed, epoch, rank, 3) % (2**31),
    ))


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
        if hasattr(kw.get("collate_fn"), "for_pass"):
            kw["collate_fn"] = kw["collate_fn"].for_pass(passes)
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


def _write_checkpoint(path: Path, model: nn.Module, ema, optimizer, epoch: int, step: int, seconds: float, meta: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}, str(path / "ema.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "epoch": torch.tensor(epoch),
        "step": torch.tensor(step),
        "seconds": torch.tensor(seconds, dtype=torch.float64),
    }
    torch.save(state, path / "state.pt")
    (path / "classifier.json").write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> dict:
    """Train ``config["classify"].model``; report per epoch; return rank 0's last metrics.

    Config keys: ``classify`` (ClassifyConfig), ``seed``, ``num_classes``, ``in_chans``,
    ``class_names``, ``image_size``, ``val_dir``, ``n_train``, ``epoch_images``,
    ``_reporter`` and, outside Ray Train, ``_dataset`` (the decoded Ray Dataset).
    """
    from timm.utils import ModelEmaV3

    cfg: ClassifyConfig = config["classify"]
    seed, num_classes, in_chans = int(config["seed"]), int(config["num_classes"]), int(config["in_chans"])
    session = _Session(config)
    if session.kind != "local":
        torch.set_num_threads(1)  # one core per worker; Ray packs workers onto few cores
    rank, world = session.rank, session.world_size
    meta = classifier_meta(cfg, config["class_names"], in_chans, config["image_size"])

    # Build the model (same init on every rank), restore, then wrap.
    model = build_classifier(cfg, num_classes, in_chans, seed)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True) if cfg.model_ema else None
    start_epoch, step, elapsed, state = 0, 0, 0.0, None
    ckpt = session.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
            if ema is not None:
                ema.module.load_state_dict(load_file(str(Path(d) / "ema.safetensors")))
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        start_epoch, step, elapsed = int(state["epoch"]), int(state["step"]), float(state["seconds"])
    if cfg.channels_last and session.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    if ema is not None:
        ema.module.to(session.device)

    # Optimiser and schedule over the whole run (also when resuming with more epochs).
    per_worker_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, math.ceil((int(config["epoch_images"]) // world) / per_worker_batch))
    optimizer = build_optimizer(bare, cfg)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scheduler.step_update(num_updates=step)  # the (new) schedule's lr at the restored step
    loss_fn = build_loss(cfg)
    mixup = MixupCutmix(cfg, num_classes) if mixup_enabled(cfg) else None
    val_x, val_y = load_val(config["val_dir"]) if rank == 0 else (None, None)

    data = session.train_data()
    last: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(_seed(seed, epoch, rank, 1))  # dropout
        batches = iterate(data, steps_per_epoch, cfg, batch_size=per_worker_batch, seed=seed, epoch=epoch, rank=rank,
                          in_chans=in_chans, image_size=config["image_size"])
        stats = train_epoch(model, batches, optimizer, scheduler, loss_fn, session.device, step=step,
                            seed=_seed(seed, rank), mixup=mixup, ema=ema, amp=cfg.amp, channels_last=cfg.channels_last)
        step = stats["step"]
        loss_sum, images = _all_reduce_sum([stats["train_loss"] * stats["images"], float(stats["images"])])
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(images, 1.0)}
        if rank != 0:
            session.report(metrics, None)
            continue
        raw = evaluate(bare, val_x, val_y, num_classes=num_classes)
        metrics.update(evaluate(ema.module, val_x, val_y, num_classes=num_classes) if ema is not None else raw)
        elapsed += time.perf_counter() - t0
        metrics.update({
            "top1_no_ema": raw["top1"], "epochs": epoch + 1, "images_per_s": images / max(stats["seconds"], 1e-9),
            "seconds": elapsed, "n_train": int(config["n_train"]), "start_epoch": start_epoch,
        })
        due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        if session.saves_checkpoints and due:  # a checkpoint costs ~1 s through Ray; not every epoch
            with tempfile.TemporaryDirectory() as d:
                _write_checkpoint(Path(d), bare, ema, optimizer, epoch + 1, step, elapsed, meta)
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
        "class_names": list(class_names), "image_size": list(image_size), "domain_bn": bool(cfg.domain_bn),
        "weights": "ema" if cfg.model_ema else "model",
    }


def _loop_config(cfg, train, val_dir, seed, class_names, in_chans, reporter) -> dict:
    if train.num_rows == 0:
        raise ValueError("train set is empty")
    check_classifier_config(cfg, len(class_names), in_chans)  # fail before any worker starts
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
        model = build_classifier(replace(cfg, pretrained_path=""), len(class_names), in_chans, seed)
        with result.checkpoint.as_directory() as d:  # the weights that top1 was measured on
            model.load_state_dict(load_file(str(Path(d) / ("ema.safetensors" if cfg.model_ema else "model.safetensors"))))
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
