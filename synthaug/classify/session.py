"""The one per-worker training loop, and the small session it reports through.

``train_loop_per_worker(config)`` is the training function. Ray Train runs it on 1 or N
workers (DDP through ``ray.train.torch.prepare_model``); a Ray Tune trial runs it directly
in its own process, a plain Ray task runs it for one worker. It talks to whichever through
``_Session`` (a :class:`synthaug.trainsession.TrainSession` with the classifier's data),
picked by ``config["_reporter"]``: ``"train"``, ``"tune"``, ``"task"`` or ``"local"``.

Data: the train shard is a streaming Ray Data iterator (``get_dataset_shard("train")``
under Ray Train, else ``config["_dataset"].iterator()``); see ``classify/data.py``.
Validation is sharded: each worker streams its own share of the val split, counts hits
with ``core.eval_counts`` for the model and its EMA in one pass, and the counts are
summed across workers (``all_reduce``). It runs every ``classify.eval_every`` epochs and
at the last; reports in between carry the latest evaluated numbers (NaN before the
first) with ``eval_epoch`` saying which epoch they are from.

Checkpoints (rank 0 only, every ``checkpoint_every`` epochs and at the last) are written
by ``core.write_checkpoint``; a run resumes from the latest one (``fit`` with the same
name and storage, or a restored Tune trial). The learning rate is a pure function of the
update count, so a run resumed with more epochs continues on the new, longer schedule.

Randomness: weight init from the seed; dropout and Mixup from (seed, epoch, rank / step);
augmentation per sample from (seed, epoch, pass, id hash); the local shuffle from
(seed, epoch, rank, pass); the file order from (seed, execution).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synthaug import console, raylocal, tracking
from synthaug.classify.augment import MixupCutmix, _seed, enabled as mixup_enabled
from synthaug.classify.core import (Distiller, build_loss, build_optimizer, build_scheduler, classifier_meta, eval_counts,
                                    metrics_from_counts, read_checkpoint, train_epoch, two_stream, write_checkpoint)
from synthaug.classify.data import iterate, val_batches, val_dataset
from synthaug.classify.models import build_classifier
from synthaug.config import ClassifyConfig
from synthaug.shuffle import BatchMix
from synthaug.trainsession import TrainSession


class _Session(TrainSession):
    """A :class:`~synthaug.trainsession.TrainSession` with the classifier's data: a Ray Train
    worker, a Tune trial, a Ray task, or local (``config["_reporter"]``)."""

    def __init__(self, config: dict):
        super().__init__(config.get("_reporter", "train"), config.get("_run_loc"), config["classify"].use_gpu)
        self.config = config

    def train_data(self, name: str = "train"):
        """This worker's stream of the ``"train"`` set, or of the ``"added"`` one (two-stream batches)."""
        if self.kind == "train":
            import ray.train

            return ray.train.get_dataset_shard(name)
        return self.config["_dataset" if name == "train" else "_added"].iterator()

    @property
    def _data_context(self):
        """The train set's DataContext when it executes in this process; None under Ray Train,
        where it executes in Train's split coordinator."""
        ds = self.config.get("_dataset")
        return None if self.kind == "train" or ds is None else ds.context

    @property
    def data_executions(self) -> int | None:
        """Completed executions of the train set in this process: Ray Data seeds each one's file
        order (``FileShuffleConfig(reseed_after_execution=True)``) from this count, so a resumed
        run restores it to read the files in the order an undisturbed run would."""
        ctx = self._data_context
        return None if ctx is None else int(getattr(ctx, "_execution_idx", 0))

    def restore_data_executions(self, n: int) -> None:
        ctx = self._data_context
        if ctx is not None and hasattr(ctx, "_execution_idx"):
            ctx._execution_idx = int(n)


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum across DDP ranks (identity on one process)."""
    import torch.distributed as dist

    values = np.asarray(values, np.float64)
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.from_numpy(values.copy())
    dist.all_reduce(t)
    return t.numpy()


def _due(epoch: int, every: int, epochs: int) -> bool:
    """Whether 0-based ``epoch`` is an every-N epoch or the last one."""
    return (every > 0 and (epoch + 1) % every == 0) or epoch + 1 == epochs


def _sync_buffers(models: dict) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers from rank 0 at the start of each forward, and each rank then
    updates its own copy with its batch, so after the last step the ranks' statistics
    differ. Sharded validation must score the one model rank 0 checkpoints.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in models.values():
        for b in m.buffers():
            dist.broadcast(b.data, src=0)


def _evaluate(models: dict, val, num_classes: int, device) -> dict:
    """Sharded validation: local counts for every model in one streamed pass, summed over workers."""
    _sync_buffers(models)
    counts = eval_counts(models, val_batches(val), num_classes, device)
    names = sorted(counts)
    total = all_reduce_sum(np.concatenate([counts[n] for n in names])).reshape(len(names), -1)
    return {n: metrics_from_counts(total[i], num_classes) for i, n in enumerate(names)}


def train_loop_per_worker(config: dict) -> dict:
    """Train ``config["classify"].model``; report per epoch; return rank 0's last metrics.

    Config keys: ``classify`` (ClassifyConfig), ``seed``, ``num_classes``, ``in_chans``,
    ``class_names``, ``image_size``, ``val_dir`` (a location), ``n_train``,
    ``epoch_images``, ``_reporter``, ``test_dir`` (None, or a test split evaluated once at the
    last epoch: ``test_top1``) and, outside Ray Train, ``_dataset`` (the decoded train Ray Dataset).
    """
    cfg: ClassifyConfig = config["classify"]
    console.quiet()  # Train's per-report and per-checkpoint lines, unless --verbose
    seed, num_classes = int(config["seed"]), int(config["num_classes"])
    session = _Session(config)
    # Under Ray (task, Train worker, Tune trial): torch threads = the CPUs Ray gave this worker
    # (classify.cpus_per_worker). A local run keeps torch's default, also inside a Ray process.
    if session.kind != "local":
        raylocal.use_assigned_cpus()
    rank, world = session.rank, session.world_size
    meta = classifier_meta(cfg, config["class_names"], int(config["in_chans"]), config["image_size"])
    model, bare, ema, (start_epoch, step, elapsed), state = _build_and_restore(session, config)

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
    val = val_dataset(config["val_dir"], rank, world)  # lazy: streamed at each evaluation
    if cfg.cache:  # opt-in, like the train set: this rank's decoded val share, once, in the worker's memory
        val = val.materialize()

    streams = (session.train_data(), session.train_data("added") if cfg.added_batch else None)
    kd = Distiller(config["kd_teachers"], cfg, session.device) if config.get("kd_teachers") else None
    track = tracking.StepLogger(config.get("_tracking"), rank)  # rank 0 logs each epoch to the driver's run
    last: dict = {}
    evaluated = {"top1": float("nan"), "top5": float("nan"), "top1_no_ema": float("nan"),
                 "per_class_top1": [float("nan")] * num_classes, "eval_epoch": 0}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(_seed(seed, epoch, rank, 1))  # dropout
        batches = _epoch_batches(streams, config, epoch, rank, world, steps_per_epoch, per_worker_batch)
        mix = BatchMix(num_classes)  # the class mix of this epoch's batches (rank 0's are reported)
        stats = train_epoch(model, mix.watch(batches), optimizer, scheduler, loss_fn, session.device, step=step,
                            seed=_seed(seed, rank), mixup=mixup, ema=ema, amp=cfg.amp, channels_last=cfg.channels_last,
                            added_weight=cfg.added_weight, kd=kd)
        step = stats["step"]
        loss_sum, images = all_reduce_sum([stats["train_loss"] * stats["images"], float(stats["images"])])
        evaluated = _evaluate_epoch(session, config, epoch, bare, ema, val, evaluated)
        elapsed += time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1, "train_loss": float(loss_sum / max(images, 1.0)), **evaluated, "epochs": epoch + 1,
            "images_per_s": float(images / max(stats["seconds"], 1e-9)), "seconds": elapsed,
            "n_train": int(config["n_train"]), "start_epoch": start_epoch, "threads": torch.get_num_threads(),
            **mix.summary(),
        }
        track.log(metrics, epoch + 1)
        _report(session, cfg, epoch, metrics, lambda d: write_checkpoint(
            Path(d), bare, ema, optimizer, epoch + 1, step, elapsed, meta,
            {} if session.data_executions is None else {"data_executions": session.data_executions}))
        if rank == 0:
            last = metrics
    track.close()
    if not last and session.kind == "task":  # restarted after its last checkpoint: nothing left to train
        last = session.store.latest_metrics()
    return last


def _build_and_restore(session: "_Session", config: dict):
    """The model (same init on every rank) and its EMA, restored from the latest checkpoint, then wrapped.

    Returns ``(model, bare model, ema, (start epoch, step, seconds), checkpoint state or None)``.
    """
    from timm.utils import ModelEmaV3

    cfg: ClassifyConfig = config["classify"]
    model = build_classifier(cfg, int(config["num_classes"]), int(config["in_chans"]), int(config["seed"]))
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True) if cfg.model_ema else None
    start_epoch, step, elapsed, state = 0, 0, 0.0, None
    ckpt = session.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = read_checkpoint(Path(d), model, ema)
        start_epoch, step, elapsed = int(state["epoch"]), int(state["step"]), float(state["seconds"])
        if "data_executions" in state:
            session.restore_data_executions(int(state["data_executions"]))
    if cfg.channels_last and session.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    if ema is not None:
        ema.module.to(session.device)
    return model, bare, ema, (start_epoch, step, elapsed), state


def _epoch_batches(streams: tuple, config: dict, epoch: int, rank: int, world: int, steps: int, batch_size: int):
    """One epoch's training batches from ``streams`` (real, added or None): with an added stream, each step's
    real batch, then its added batch."""
    cfg: ClassifyConfig = config["classify"]
    data, added = streams
    seed = int(config["seed"])
    common = dict(epoch=epoch, rank=rank, in_chans=int(config["in_chans"]), image_size=config["image_size"])
    batches = iterate(data, steps, cfg, batch_size=batch_size, seed=seed, buffer_rows=config.get("shuffle_rows"),
                      **common)
    if added is None:
        return batches
    return two_stream(batches, iterate(added, steps, cfg, batch_size=max(1, cfg.added_batch // world),
                                       seed=_seed(seed, 7), buffer_rows=config.get("added_shuffle_rows"), **common))


def _evaluate_epoch(session: "_Session", config: dict, epoch: int, bare, ema, val, evaluated: dict) -> dict:
    """Validation on every rank's share, reduced (every ``eval_every`` epochs and at the last), and the
    test split once with the final weights; otherwise the last evaluation's figures."""
    cfg: ClassifyConfig = config["classify"]
    num_classes, rank, world = int(config["num_classes"]), session.rank, session.world_size
    if _due(epoch, cfg.eval_every, cfg.epochs):
        models = {"model": bare, **({"ema": ema.module} if ema is not None else {})}
        res = _evaluate(models, val, num_classes, session.device)
        final = res["ema"] if ema is not None else res["model"]
        evaluated = {**final, "top1_no_ema": res["model"]["top1"], "eval_epoch": epoch + 1}
    if config.get("test_dir") and epoch + 1 == cfg.epochs:  # the reported split: the final weights, once
        final_model = {"final": ema.module if ema is not None else bare}
        evaluated["test_top1"] = _evaluate(final_model, val_dataset(config["test_dir"], rank, world), num_classes,
                                           session.device)["final"]["top1"]
    return evaluated


def _report(session: "_Session", cfg: ClassifyConfig, epoch: int, metrics: dict, write) -> None:
    """Report an epoch's metrics; rank 0 attaches a checkpoint (``write(dir)``) every ``checkpoint_every`` epochs."""
    if session.rank == 0 and session.saves_checkpoints and _due(epoch, cfg.checkpoint_every, cfg.epochs):
        with tempfile.TemporaryDirectory() as d:  # ~1 s through Ray
            write(d)
            session.report(metrics, d)
    else:
        session.report(metrics, None)
