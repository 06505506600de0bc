"""Classifier training drivers: ``fit`` (a Ray task for one worker, Ray Train for more) and
``fit_local`` (this process / a Tune trial). Every path runs the same per-worker loop
(``session.train_loop_per_worker``).

The pieces live in three modules: ``core`` (plain PyTorch: ``train_epoch``, ``evaluate``,
the recipe's builders, checkpoint files), ``data`` (the Ray Data input pipelines) and
``session`` (the per-worker loop and its Ray Train / Tune session). The drivers only
check, build the lazy train dataset and launch.

``train`` is a ``mixing.Mixture`` (planned by ``mixing.plan_mixture`` from dataset
locations) or a dataset location (``str``/path: every row of that contract dataset).
No table passes through the driver: workers stream the Parquet shards through Ray Data.

timm supplies the recipe: the model (``create_model``), ``create_transform`` augmentation
(RandAugment, random erasing; see ``augment.py``), Mixup / CutMix with label smoothing,
``ModelEmaV3``, ``create_optimizer_v2`` and ``create_scheduler_v2`` (cosine with warm-up,
stepped per update). bf16 autocast and channels_last apply on GPU.

Fixed cost per run: the train dataset is streamed once per epoch (one Ray Data execution;
none extra with ``classify.cache``) and validated every ``classify.eval_every`` epochs and
at the last (one streamed pass over each worker's share of val).
"""

from __future__ import annotations

from pathlib import Path

from synthaug import console, identity, storage, tracking
from synthaug.classify.data import decode_to_uint8, iterate, shuffle_rows, training_dataset, val_batches, val_dataset  # noqa: F401
from synthaug.classify.mixing import Mixture, parts, real_only, streams
from synthaug.classify.model_names import check_classifier_config
from synthaug.config import ClassifyConfig, RayConfig, replace, to_dict
from synthaug.errors import InputValueError
from synthaug.shuffle import warn_if_blocked

# The public core, re-exported for callers but imported only when asked for: the core
# imports torch (about 2 s), which a driver that only plans and launches never needs.
_CORE = ("array_batches", "build_loss", "build_optimizer", "build_scheduler", "classifier_meta", "evaluate", "train_epoch")


def __getattr__(name: str):
    if name in _CORE:
        from synthaug.classify import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RESULT_KEYS = (
    "top1", "top5", "top1_no_ema", "train_loss", "images_per_s", "epochs", "seconds", "n_train", "start_epoch",
    "per_class_top1", "batch_blocked_share", "batch_label_entropy", "test_top1", "threads",
)


def as_mixture(train: Mixture | str | Path) -> Mixture:
    """A Mixture as is; a dataset location as every row of it."""
    if isinstance(train, Mixture):
        return train
    if isinstance(train, (str, Path)):
        return real_only(str(train))
    raise TypeError(f"train must be a mixing.Mixture or a dataset location, got {type(train).__name__} "
                    "(tables no longer pass through the driver)")


def _loop_config(cfg: ClassifyConfig, spec: Mixture, val_dir, seed: int, class_names, in_chans: int, reporter: str,
                 test_dir=None) -> dict:
    if spec.num_rows == 0:
        raise InputValueError("train set is empty")
    if list(spec.class_names) != list(class_names):
        raise InputValueError(f"train set class names {list(spec.class_names)} differ from class_names {list(class_names)}")
    check_classifier_config(cfg, len(class_names), in_chans)  # fail before any worker starts
    # One epoch = epoch_images images, by default the real rows: a 1:3 mix then gets the same
    # optimiser steps as real-only, so a ratio's effect is not a training-length effect.
    epoch_images = cfg.epoch_images or spec.n_real or spec.num_rows
    return {
        "epoch_images": int(epoch_images),
        "classify": cfg, "seed": int(seed), "num_classes": len(class_names), "in_chans": int(in_chans),
        "class_names": list(class_names), "image_size": list(spec.image_size),
        "val_dir": storage.absolute(str(val_dir)), "n_train": int(spec.num_rows), "_reporter": reporter,
        "shuffle_rows": shuffle_rows(cfg, spec), "_tracking": tracking.handle(),
        "test_dir": storage.absolute(str(test_dir)) if test_dir else None,
        **_two_stream_config(cfg, spec),
    }


def _two_stream_config(cfg: ClassifyConfig, spec: Mixture) -> dict:
    """Two-stream batches: the added stream's shuffle buffer and the distillation teachers (checked here)."""
    if not cfg.added_batch:
        return {}
    _, added = streams(spec)
    teachers = kd_teachers(cfg)
    for t in teachers:
        if not storage.is_file(storage.join(t, "classifier.json")):
            raise InputValueError(f"classify.kd_teacher: {t} is not a saved classifier (no classifier.json)")
    return {"added_shuffle_rows": shuffle_rows(cfg, added), "kd_teachers": [storage.absolute(t) for t in teachers]}


def kd_teachers(cfg: ClassifyConfig) -> list[str]:
    """The locations in ``classify.kd_teacher`` (comma-separated)."""
    return [t.strip() for t in cfg.kd_teacher.split(",") if t.strip()]


def train_datasets(cfg: ClassifyConfig, spec: Mixture, seed: int) -> dict:
    """The lazy decoded train datasets: ``{"train"}``, or ``{"train": real rows, "added": added rows}`` for
    two-stream batches (each with its own seeded file order)."""
    if not cfg.added_batch:
        return {"train": training_dataset(spec, seed=seed, cache=cfg.cache)}
    real, added = streams(spec)
    return {"train": training_dataset(real, seed=seed, cache=cfg.cache),
            "added": training_dataset(added, seed=seed + 1_000_003, cache=cfg.cache)}


def run_key(cfg: ClassifyConfig, spec: Mixture, val_dir, seed: int, class_names, in_chans: int,
            test_dir=None) -> tuple[str, dict]:
    """The content key of one classifier run, and the inputs it covers (see ``synthaug.identity``).

    Inputs: the mixture by content (the real, synthetic and extra sets' hashes, the per-class
    thresholds and counts), the val set's hash and the pretrained weights' hash; config:
    every ``classify`` field that changes the result (not retries, checkpoint cadence or
    caching), the seed, the class names and channels.
    """
    from synthaug import identity
    from synthaug.artifacts import sha256_file

    inputs = {
        "real": identity.dataset_hash(spec.real) if spec.real else None,
        "synthetic": identity.dataset_hash(spec.synthetic) if spec.synthetic else None,
        "mixture": {"thresholds": {str(k): v for k, v in sorted(spec.thresholds.items())},
                    "counts": {str(k): v for k, v in sorted(spec.counts.items())}, "ratio": spec.ratio,
                    "synthetic_only": spec.synthetic_only, "seed": spec.seed},
        "val": identity.dataset_hash(str(val_dir)),
        "pretrained": sha256_file(cfg.pretrained_path) if cfg.pretrained_path else None,
    }
    if getattr(spec, "extra", None) is not None:  # only then: the keys of runs without one stay as they were
        inputs["extra"] = identity.dataset_hash(spec.extra)
    if cfg.kd_teacher:  # the teachers by the key their classifier.json records (the run that made their weights)
        import hashlib
        import json

        metas = [storage.read_bytes(storage.join(t, "classifier.json")) for t in kd_teachers(cfg)]
        inputs["kd_teachers"] = [json.loads(m).get("key") or hashlib.sha256(m).hexdigest() for m in metas]
    if test_dir:  # likewise: only a run that reports on a test split
        inputs["test"] = identity.dataset_hash(str(test_dir))
    threads = {} if cfg.cpus_per_worker == 1 else {"threads": int(cfg.cpus_per_worker)}  # 1: the keys as before
    key = identity.artifact_key("classify", identity.config_fields("classify", cfg), inputs, seed=int(seed),
                                class_names=list(class_names), in_chans=int(in_chans), **threads)
    return key, inputs


def _result(metrics: dict | None) -> dict:
    if not metrics:
        raise RuntimeError("training reported no metrics")
    return {k: metrics.get(k) for k in RESULT_KEYS}  # test_top1: None without a test split


def _data_config(num_workers: int, names=("train",)):
    """Ray Train ingest: "train" split over the workers (each streams its shard), in a fixed row order.

    One worker gets the dataset unsplit: the same rows in the same order, without the
    streaming-split coordinator actor that a split starts (seconds of fixed cost per run).
    """
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=list(names) if num_workers > 1 else [],
                                execution_options={n: opts for n in names})


def fit(
    cfg: ClassifyConfig,
    train: Mixture | str | Path,
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
    test_dir: str | Path | None = None,
) -> dict:
    """Train ``cfg.num_workers`` workers; returns the final epoch's flat metrics.

    One worker runs the loop in one Ray task (:func:`_fit_task`), more are Ray Train DDP
    workers, as is one worker under a Tune trial's ``callbacks``.

    ``train``: a ``Mixture`` or a dataset location. The run lives in
    ``out_dir/<name>-<key[:12]>`` (any location: Ray storage through
    ``storage.ray_storage``), keyed by :func:`run_key`: calling again with the same config
    and inputs resumes from its latest checkpoint (a finished run returns its final
    metrics at once); a changed hyperparameter or input is another run. The run's
    ``artifact.json`` records its key, inputs and config. With ``save_model`` the final
    model is published at ``out_dir/model`` for ``load_classifier`` (its
    ``classifier.json`` carries the key). ``callbacks`` go to ``RunConfig`` (a Tune trial passes
    ``TuneReportCallback`` to forward each epoch). ``test_dir``: a test split, evaluated once with
    the final weights (``test_top1``); nothing is chosen on it (None without one).
    """
    from synthaug.raylocal import init_ray

    spec = as_mixture(train)
    config = _loop_config(cfg, spec, val_dir, seed, class_names, in_chans, "train", test_dir)
    key, inputs = run_key(cfg, spec, val_dir, seed, class_names, in_chans, test_dir)
    name = identity.run_name(name, key)
    out_dir = storage.absolute(str(out_dir))
    run_loc, model_loc = storage.join(out_dir, name), storage.join(out_dir, "model")
    done = identity.keyed_record(run_loc, key)
    if (not callbacks and done and "metrics" in done
            and (not save_model or identity.matches(model_loc, key, "classifier.json"))):
        print(f"[classify] {name}: reusing the finished run (same key)", flush=True)
        tracking.reused(name, key, run_loc)
        return {**done["metrics"], "key": key}
    init_ray(ray_cfg)
    config["_tracking"] = tracking.open_run(name, {"classify": to_dict(cfg), "seed": seed}, {"synthaug.key": key})
    if cfg.num_workers == 1 and not callbacks:
        metrics, final = _fit_task(cfg, spec, config, seed, run_loc)
    else:
        metrics, final = _fit_train(cfg, spec, config, seed, out_dir, name, callbacks)
    warn_if_blocked("classify", " + ".join(loc for _, loc in parts(spec)), metrics)
    if save_model:
        from safetensors.torch import load_file

        from synthaug.classify.core import classifier_meta
        from synthaug.classify.models import build_classifier, save_classifier

        meta = {**classifier_meta(cfg, class_names, in_chans, config["image_size"]), "key": key, "inputs": inputs}
        model = build_classifier(replace(cfg, pretrained_path=""), len(class_names), in_chans, seed)
        with final.as_directory() as d:  # the weights that top1 was measured on
            model.load_state_dict(load_file(str(Path(d) / ("ema.safetensors" if cfg.model_ema else "model.safetensors"))))
        save_classifier(model, model_loc, meta)
    identity.write_record(run_loc, "classify", key, inputs, to_dict(cfg), seed=int(seed), metrics=metrics)
    tracking.close_run(config["_tracking"], metrics)
    return {**metrics, "key": key}


def _fit_task(cfg: ClassifyConfig, spec: Mixture, config: dict, seed: int, run_loc: str):
    """One worker: the loop in one Ray task (``trainsession.run_task``), checkpoints in the run's storage.

    Ray's advice for one worker, as in a Tune trial: no Train controller, worker group or
    process group to start for every classifier. A task whose process or node dies is run
    again (``classify.max_failures`` times) and resumes from the latest checkpoint.
    """
    from synthaug.trainsession import run_task

    ds = train_datasets(cfg, spec, seed)
    out, store = run_task(_train_loop, {**config, "_dataset": ds["train"], "_added": ds.get("added")}, run_loc,
                          name="classify", num_cpus=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, max_retries=cfg.max_failures)
    return _result(out), store.latest_checkpoint()


def _fit_train(cfg: ClassifyConfig, spec: Mixture, config: dict, seed: int, out_dir: str, name: str, callbacks):
    """``cfg.num_workers`` Ray Train workers (DDP), or one under a Tune trial's callbacks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=console.train_logging(),
            callbacks=list(callbacks or []),
            **storage.ray_storage(out_dir),
        ),
        datasets=(datasets := train_datasets(cfg, spec, seed)),
        dataset_config=_data_config(cfg.num_workers, tuple(datasets)),
    )
    result = trainer.fit()
    return _result(result.metrics), result.checkpoint


def _train_loop(config: dict):
    """The Train workers' function, by reference: timm and the loop are imported in the workers, not here."""
    from synthaug.classify.session import train_loop_per_worker

    return train_loop_per_worker(config)


def fit_local(
    cfg: ClassifyConfig,
    train: Mixture | str | Path,
    val_dir: str | Path,
    *,
    seed: int,
    class_names: list[str],
    in_chans: int,
    reporter: str = "tune",
    ray_cfg: RayConfig | None = None,
    test_dir: str | Path | None = None,
) -> dict:
    """Run ``train_loop_per_worker`` in this process (a Tune trial: ``reporter="tune"``).

    Ray's advice for Tune: call the training function directly for one worker, and build
    a ``TorchTrainer`` inside the trial (``fit``) for more. ``reporter="local"`` runs
    without a Tune session (no checkpoints). The train set is a Ray Dataset, so Ray is
    started (``init_ray``) when it is not running.
    """
    if cfg.num_workers != 1:
        raise ValueError(f"fit_local runs one worker; classify.num_workers={cfg.num_workers} needs fit()")
    from synthaug.raylocal import init_ray

    spec = as_mixture(train)
    config = _loop_config(cfg, spec, val_dir, seed, class_names, in_chans, reporter, test_dir)
    init_ray(ray_cfg)  # a no-op inside a Tune trial, where Ray is already up
    ds = train_datasets(cfg, spec, seed)
    config["_dataset"], config["_added"] = ds["train"], ds.get("added")
    from synthaug.classify.session import train_loop_per_worker

    return _result(train_loop_per_worker(config))
