"""Checks of names and paths, before any stage spends compute.

:func:`check_inputs` is what ``synthaug <stage>`` (and ``--dry-run``) runs after the
config is loaded: every name a stage will look up (timm models, generator families and
presets) and every path that must exist (the ingest source, bases, weights files, the
datasets and exports named on the command line). The section configs check their own
values in ``__post_init__``; these checks import timm, torch or diffusers, so they are
kept out of ``synthaug.config``. Each failure is an :class:`~synthaug.errors.InputError`
naming the key, option or path.
"""

from __future__ import annotations

from typing import Any

from synthaug import storage
from synthaug.config import Config, ConfigError
from synthaug.errors import InputNotFound, InputValueError

# Which parts of the config each command uses (the whole run uses them all).
_USES = {
    "run": {"ingest", "pretrain", "finetune", "sample", "evaluate", "classify", "sweep"},
    "ingest": {"ingest"},
    "pretrain": {"pretrain"},
    "finetune": {"finetune"},
    "sample": {"sample"},
    "evaluate": {"evaluate", "classify"},  # the in-domain extractor and CAS are classifiers
    "classify": {"classify"},
    "sweep": {"sample", "classify", "sweep"},
    "pseudolabel": {"classify"},  # the teacher and the students are classifiers
    "filter": {"classify"},
    "study": {"ingest", "pretrain", "finetune", "sample", "classify", "sweep"},
    "estimate": set(),
}


def _dataset(loc: str, what: str) -> dict:
    """The manifest of a complete dataset the user named (``what``: the option or key)."""
    from synthaug.artifacts import DatasetError, read_manifest, shard_paths

    if not storage.exists(loc):
        raise InputNotFound(f"{what}: {loc} does not exist")
    try:
        m = read_manifest(loc)
        shard_paths(loc, m)  # every listed shard is there
    except DatasetError as e:
        raise DatasetError(f"{what}: {e}") from None
    return m


def check_ingest(cfg: Config) -> None:
    i = cfg.ingest
    if i.source == "imagefolder" and not storage.is_dir(i.path):
        raise InputNotFound(f"config key 'ingest.path': image folder {i.path} does not exist")
    if i.source == "parquet" and not storage.exists(i.path):
        raise InputNotFound(f"config key 'ingest.path': Parquet source {i.path} does not exist")


def check_generator_config(cfg: Config, stage: str, base: str | None = None) -> None:
    """The family is registered, a new model's preset exists, a base is a complete one of that family."""
    from synthaug.generative import registry

    t = getattr(cfg, stage)
    if t.family not in registry.names():
        raise ConfigError(f"config key '{stage}.family': unknown generator family {t.family!r}; registered: {registry.names()}")
    base = base or t.base
    what = "--base" if base and base != t.base else f"config key '{stage}.base'"
    if base:
        from synthaug.generative import models

        try:
            models.resolve_base(base, t.family, cfg.allow_downloads)
        except models.GeneratorError as e:
            raise models.GeneratorError(f"{what}: {e}") from None
    elif t.family == "unet":
        from synthaug.generative.models import ARCHS

        if t.arch not in ARCHS:
            raise ConfigError(f"config key '{stage}.arch': unknown UNet preset {t.arch!r}; choose from {sorted(ARCHS)}")


def check_generator_export(loc: str, what: str) -> dict:
    """A finished generator export: manifest, denoiser config and weights (no weights read)."""
    from synthaug.artifacts import MANIFEST, read_manifest
    from synthaug.generative import models

    if not storage.exists(loc):
        raise InputNotFound(f"{what}: generator directory {loc} does not exist")
    if not storage.is_file(storage.join(loc, MANIFEST)):
        raise models.GeneratorError(f"{what}: {loc} has no manifest.json, so it is not a finished generator export")
    m = read_manifest(loc)
    models.check_base_dir(loc, m.get("family", "unet"))
    return m


def check_sample(cfg: Config) -> None:
    """Image-to-image: a real set named in ``sample.source`` is a complete dataset."""
    s = cfg.sample
    if s.init == "real" and s.source:
        _dataset(s.source, "config key 'sample.source'")


def check_classify(cfg: Config) -> None:
    from synthaug.classify.model_names import check_model_name

    check_model_name(cfg.classify.model)
    p = cfg.classify.pretrained_path
    if p and not storage.is_file(p):
        raise InputNotFound(f"config key 'classify.pretrained_path': {p} is not a file")


def check_evaluate(cfg: Config) -> None:
    e = cfg.evaluate
    if e.extractor == "inception-v3-compat":
        from synthaug.evaluate.extractors import verify_inception_weights

        if e.inception_weights and not storage.is_file(e.inception_weights):
            raise InputNotFound(f"config key 'evaluate.inception_weights': {e.inception_weights} is not a file")
        verify_inception_weights(e.inception_weights, e.inception_sha256)


def _check_classes(real_m: dict, syn_m: dict, real: str, syn: str) -> None:
    if list(real_m["class_names"]) != list(syn_m["class_names"]):
        raise InputValueError(f"--synthetic {syn}: class names {list(syn_m['class_names'])} differ from the real set "
                              f"{real}'s {list(real_m['class_names'])}")


def check_args(cfg: Config, stage: str, args: Any) -> None:
    """The paths and values given as command-line options."""
    from synthaug.pipeline import RunPaths

    p = RunPaths(cfg)
    get = lambda k: getattr(args, k, None)  # noqa: E731
    if stage in ("pretrain", "finetune"):
        check_generator_config(cfg, stage, get("base"))
        if get("data"):
            _dataset(get("data"), "--data")
    if stage == "sample" and get("generator"):
        check_generator_export(get("generator"), "--generator")
    real = get("real")
    if real:
        _dataset(real, "--real")
    synthetic = list(get("synthetic") or [])
    syn_ms = [(d, _dataset(d, "--synthetic")) for d in synthetic]
    if stage == "evaluate":
        if not synthetic:
            raise InputValueError("--synthetic: give at least one synthetic dataset directory")
        if get("train"):
            _dataset(get("train"), "--train")
        ex = get("extractor")
        if ex and not storage.is_file(storage.join(ex, "classifier.json")):
            raise InputNotFound(f"--extractor: {ex} is not a saved classifier (no classifier.json)")
    if stage == "pseudolabel":
        pool = get("pool") or p.data("pool")
        if not storage.exists(pool):
            raise InputNotFound(f"--pool: {pool} does not exist (ingest writes data/pool with ingest.k_per_class > 0 "
                                "and ingest.unlabelled_pool: true; or name one with --pool)")
        _dataset(pool, "--pool")
    if stage in ("pseudolabel", "filter") and get("data"):
        _dataset(get("data"), "--data")
    if stage == "classify":
        ratio = get("ratio")
        if ratio is not None and not (ratio >= 0 and ratio != float("inf")):
            raise InputValueError(f"--ratio: must be a finite number >= 0, got {ratio}")
        if get("synthetic_only") and not synthetic:
            raise InputValueError("--synthetic-only needs a --synthetic dataset")
        data = get("data")
        train_m = _dataset(data, "--data") if data else None
        if syn_ms:
            if train_m is None and storage.exists(p.data("train")):
                train_m, data = _dataset(p.data("train"), "the run's train set"), p.data("train")
            if train_m is not None:
                for d, m in syn_ms:
                    _check_classes(train_m, m, data, d)


def check_inputs(cfg: Config, stage: str, args: Any = None) -> None:
    """Everything ``stage`` would fail on that can be known now: names, paths, options."""
    uses = _USES.get(stage, set())
    if "ingest" in uses:
        check_ingest(cfg)
    if stage in ("run", "study"):
        for s in ("pretrain", "finetune"):
            check_generator_config(cfg, s)
    if "sample" in uses:
        check_sample(cfg)
    if "classify" in uses:
        check_classify(cfg)
    if "evaluate" in uses:
        check_evaluate(cfg)
    if args is not None:
        check_args(cfg, stage, args)
