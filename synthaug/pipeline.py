"""The stages wired together: where each reads and writes, and the end-to-end default run.

Run layout (``work_dir`` is git-ignored; ``results_dir`` holds what a reader looks at)::

    <work_dir>/<name>/config.yaml            the resolved config of the last successful run
    <work_dir>/<name>/config.attempt.yaml    an attempt's config, written before any work (removed on success)
    <work_dir>/<name>/data/{train,val,pool,train_full}/   ingest (contract datasets)
    <work_dir>/<name>/generators/{pretrain,finetune}/     generator exports
    <work_dir>/<name>/ray/                   Ray Train / Tune storage (checkpoints)
    <work_dir>/<name>/latents/<key>/         latent caches of the latent families (``*.latent_cache``)
    <work_dir>/<name>/extractor/             in-domain feature extractor (classifier)
    <work_dir>/<name>/classify/              classifier runs; classify/model is the teacher (real-only, labelled set)
    <work_dir>/<name>/pseudolabel/sets/<key>/  pseudo-labelled pool rows (contract dataset); student runs beside
    <work_dir>/<name>/filtered/<key>/        synthetic sets filtered by the teacher's confidence (contract datasets)
    <work_dir>/samples/<key>/                sampled sets, keyed by content (shared by runs)
    <results_dir>/<name>/                    metrics.json, summary.md, plots, grids, sweep table
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from synthaug import storage, tracking
from synthaug.artifacts import is_complete, read_manifest
from synthaug.config import Config, dump_config, replace


@dataclass(frozen=True)
class RunPaths:
    """Every location a run reads or writes, derived from the config alone.

    Each is a plain string built with :func:`synthaug.storage.join`, so ``work_dir`` and
    ``results_dir`` may be local paths, shared mounts or URIs (``s3://bucket/prefix``).
    """

    cfg: Config

    @property
    def work(self) -> str:
        return storage.join(self.cfg.work_dir, self.cfg.name)

    @property
    def results(self) -> str:
        return storage.join(self.cfg.results_dir, self.cfg.name)

    def data(self, split: str) -> str:
        return storage.join(self.work, "data", split)

    def generator(self, stage: str) -> str:
        return storage.join(self.work, "generators", stage)

    @property
    def ray(self) -> str:
        """Ray Train / Tune storage: absolute, since Ray's workers need the same path on every node."""
        return storage.absolute(storage.join(self.work, "ray"))

    def test(self) -> str | None:
        """The test split (reported, never chosen on), or None when the ingest wrote none."""
        return self.data("test") if is_complete(self.data("test")) else None

    def train_full(self) -> str:
        """The whole labelled train split (low-data runs) or the train split itself."""
        full = self.data("train_full")
        return full if is_complete(full) else self.data("train")

    @property
    def extractor(self) -> str:
        return storage.join(self.work, "extractor", "model")

    @property
    def cache(self) -> str:
        return storage.join(self.cfg.work_dir, "cache")


class Timer:
    """Collects wall-clock seconds per stage for the report; each stage is a tracked child run
    (``synthaug.tracking``: params from the ``Config`` among its arguments, its result's numbers)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str, fn, *args, **kwargs):
        t0 = time.time()
        print(f"\n=== {stage} ===", flush=True)
        with tracking.stage(stage, next((a for a in args if isinstance(a, Config)), None)):
            out = fn(*args, **kwargs)
            self.seconds[stage] = round(time.time() - t0, 1)
            tracking.final(out, seconds=self.seconds[stage])
        print(f"=== {stage} done in {self.seconds[stage]}s ===", flush=True)
        return out


# ----------------------------------------------------------------------------- stages


def stage_ingest(cfg: Config) -> dict:
    from synthaug.data import ingest

    return ingest.run(cfg, storage.join(RunPaths(cfg).work, "data"))


def stage_pretrain(cfg: Config, data: str | Path | None = None, out: str | Path | None = None) -> dict:
    """Unconditional pretraining on the unlabelled pool, or on ``pretrain.data`` (any corpus; labels = null class)."""
    from synthaug.generative import finetune

    p = RunPaths(cfg)
    return finetune.run(cfg, "pretrain", data or cfg.pretrain.data or p.data("pool"), out or p.generator("pretrain"),
                        p.ray, unconditional=True)


def stage_finetune(cfg: Config, data: str | Path | None = None, base: str | Path | None = None,
                   out: str | Path | None = None) -> dict:
    """Class-conditional fine-tuning from ``base`` (config, argument, or this run's pretrained export)."""
    from synthaug.generative import finetune

    p = RunPaths(cfg)
    if base is None and not cfg.finetune.base and is_complete(p.generator("pretrain")):
        base = p.generator("pretrain")
    return finetune.run(cfg, "finetune", data or cfg.finetune.data or p.data("train"), out or p.generator("finetune"),
                        p.ray, base_dir=base)


def with_strength(cfg: Config, guidance: float, strength: float | None) -> Config:
    """``cfg`` sampling at ``guidance``: image-to-image at ``strength``, or text-to-image when it is None."""
    sample = replace(cfg.sample, guidance_scale=float(guidance))
    if strength is not None:
        sample = replace(sample, init="real", strength=float(strength))
    elif cfg.sample.init == "real":
        sample = replace(sample, init="noise")
    return replace(cfg, sample=sample)


def stage_sample(cfg: Config, generator: str | None = None, out: str | None = None) -> tuple[str, dict]:
    """Sample from this run's fine-tuned export (or ``generator``); image-to-image starts from
    ``sample.source``, by default this run's labelled train split."""
    from synthaug.generative import sample

    p = RunPaths(cfg)
    source = (cfg.sample.source or p.data("train")) if cfg.sample.init == "real" else None
    return sample.run(cfg, generator or p.generator("finetune"), out, source_dir=source)


def stage_extractor(cfg: Config) -> str:
    """The in-domain feature extractor: a classifier trained on the whole real train split."""
    from synthaug.classify.train import fit

    p = RunPaths(cfg)
    train_dir = p.train_full()
    m = read_manifest(train_dir)
    ccfg = replace(cfg.classify, epochs=cfg.evaluate.extractor_epochs, num_workers=1)
    # Keyed like every classifier run: an export whose classifier.json holds this key is
    # reused; another config or another train/val set trains (and publishes) a new one.
    fit(ccfg, str(train_dir), str(p.data("val")), seed=0, out_dir=storage.parent(p.extractor), name="extractor",
        class_names=m["class_names"], in_chans=m["channels"], ray_cfg=cfg.ray, save_model=True)
    return p.extractor


def stage_evaluate(cfg: Config, real: str | Path, synthetic: str | Path, extractor: str | Path,
                   train: str | Path | None = None, labelled_train: str | Path | None = None) -> dict:
    """One synthetic set: fidelity (torch-fidelity, in-domain extractor), per-class FID, the
    near-copy audit against ``train`` and CAS (trained on ``synthetic``, tested on ``real``).

    Features come from a Ray Data actor pool (``evaluate.min_actors/max_actors/
    num_gpus_per_actor``); FID from merged sums of every image, IS/KID/PR from a capped
    subset (``evaluate.max_samples``). Locations may be URIs. Returns flat metrics plus the
    nested ``_audit``, ``per_class_fid`` and ``cas_per_class_top1`` that the report turns
    into tables and grids.
    """
    from synthaug import storage
    from synthaug.evaluate import cas, fidelity, memorization

    p = RunPaths(cfg)
    e = cfg.evaluate
    cache = str(p.cache)
    weights = {"inception_weights": e.inception_weights, "expected_sha256": e.inception_sha256}
    metrics = fidelity.compute_fidelity(real, synthetic, extractor, e, cache, **weights)
    if e.per_class_fid:
        metrics["per_class_fid"] = fidelity.compute_per_class_fid(real, synthetic, extractor, e, cache, **weights)
    if train is not None:
        audit = memorization.near_copy_audit(
            train, real, synthetic, str(extractor), percentile=e.near_copy_percentile, top_k=e.near_copy_top_k,
            chunk=e.near_copy_chunk, batch_size=e.batch_size, cache_dir=storage.join(cache, "features"),
            min_actors=e.min_actors, max_actors=e.max_actors, num_gpus=e.num_gpus_per_actor)
        for k in ("near_copy_share", "near_copy_threshold", "pixel_near_copy_share", "pixel_threshold"):
            metrics[k] = audit[k]
        metrics["_audit"] = audit
    if labelled_train is not None:
        key = read_manifest(synthetic)["content_hash"][:12]
        metrics.update(cas.cas(cfg.classify, synthetic, real, labelled_train, storage.join(p.work, "cas"), ray_cfg=cfg.ray,
                               name=f"cas-{key}"))
    return metrics


def stage_teacher(cfg: Config, train: str | None = None, val: str | None = None) -> dict:
    """The real-only classifier on the labelled set (seed ``pseudolabel.teacher_seed``), exported.

    Keyed like ``synthaug classify --ratio 0`` with that seed, in the same place, so either
    reuses the other's run. Returns ``{"model", "key", "metrics"}``.
    """
    from synthaug.classify.pseudolabel import train_teacher

    p = RunPaths(cfg)
    return train_teacher(cfg, str(train or p.data("train")), str(val or p.data("val")), storage.join(p.work, "classify"))


def stage_pseudolabel(cfg: Config, train: str | None = None, val: str | None = None, pool: str | None = None,
                      teacher: dict | None = None, synthetic: str | None = None, ratio: float = 1.0) -> dict:
    """The pseudo-label baseline: teacher -> label the pool (streamed) -> students per seed.

    Returns the pseudo-labelled set's location and figures and each student's metrics
    (``students``; with ``synthetic``, also ``combined``: labelled + pseudo-labelled +
    ``ratio`` x synthetic).
    """
    from synthaug.classify import pseudolabel as PL

    p = RunPaths(cfg)
    train, val, pool = str(train or p.data("train")), str(val or p.data("val")), str(pool or p.data("pool"))
    teacher = teacher or stage_teacher(cfg, train, val)
    runs = storage.join(p.work, "pseudolabel")
    out, m = pseudo_set(cfg, teacher, pool)
    result = {
        "dataset": out, "n_pseudo": int(m["num_rows"]), "pool_rows": int(m["pool_rows"]),
        "kept_share": int(m["num_rows"]) / max(1, int(m["pool_rows"])), "pseudo_counts": dict(m["counts"]),
        "selection": m["selection"], "teacher_top1": float(teacher["metrics"]["top1"]),
        "students": PL.train_students(cfg, train, val, out, runs, test=p.test()),
    }
    if synthetic is not None:
        result["combined"] = PL.train_students(cfg, train, val, out, runs, synthetic=str(synthetic), ratio=ratio,
                                               test=p.test())
        result["combined_ratio"] = float(ratio)
    return result


def pseudo_set(cfg: Config, teacher: dict, pool: str | None = None) -> tuple[str, dict]:
    """The pool labelled by ``teacher`` and selected (``pseudolabel.*``), written once per key: (location, manifest)."""
    from synthaug.classify import pseudolabel as PL

    p = RunPaths(cfg)
    pool = str(pool or p.data("pool"))
    out = storage.join(p.work, "pseudolabel", "sets", PL.pseudolabel_key(cfg, teacher, pool)[:16])
    return out, PL.label_pool(cfg, teacher, pool, out)


def stage_dpt(cfg: Config, teacher: dict, base: str | None = None) -> str:
    """DPT (arXiv 2302.10586): a generator fine-tuned on the labelled rows plus the pseudo-labelled
    pool (``finetune.extra_data``), sampled with the sample config's recipe; returns the sampled set."""
    p = RunPaths(cfg)
    labelled, _ = pseudo_set(cfg, teacher)
    dcfg = replace(cfg, finetune=replace(cfg.finetune, extra_data=(*cfg.finetune.extra_data, labelled)))
    out = p.generator("finetune-dpt")
    stage_finetune(dcfg, base=base, out=out)
    return stage_sample(cfg, generator=out)[0]


def stage_filter(cfg: Config, synthetic: str, teacher: dict | None = None) -> tuple[str, dict]:
    """``synthetic`` filtered by the teacher's confidence (``filter.tau``): (location, manifest)."""
    from synthaug.classify import pseudolabel as PL

    p = RunPaths(cfg)
    teacher = teacher or stage_teacher(cfg)
    out = storage.join(p.work, "filtered", PL.filter_key(cfg, teacher, str(synthetic))[:16])
    return out, PL.filter_synthetic(cfg, teacher, str(synthetic), out)


def synthetic_sets(cfg: Config, timer=None, headline: bool = True) -> tuple[dict, dict, dict, dict | None]:
    """Every synthetic set a run (or ``synthaug sweep``) needs, each sampled or filtered once.

    Sampling runs once per (guidance, strength): the sample config's recipe at every
    guidance of the sweep and ``sample.guidance_scale``, plus each ``sweep.strengths``
    value; each sampled set is filtered once per tau > 0 (``sweep.taus``, or
    ``filter.tau``). Returns ``(sets, mix_sets, filtered, teacher)``: guidance -> the sample
    config's set (evaluated and reported); ``(guidance, strength, tau)`` -> the set to mix
    (filtered when tau > 0); ``(guidance, strength, tau)`` -> the filtered set's manifest;
    the teacher when one was trained. ``headline=False`` leaves out ``sample.guidance_scale``
    when the sweep does not list it.
    """
    from synthaug.sweep import primary_strength, setting_label, settings

    timer = timer or (lambda _stage, fn, *a, **kw: fn(*a, **kw))
    s0, t0 = primary_strength(cfg), float(cfg.filter.tau)
    guidance = sorted({float(g) for g in cfg.sweep.guidance_scales} | ({float(cfg.sample.guidance_scale)} if headline else set()))
    grid = settings(replace(cfg, sweep=replace(cfg.sweep, guidance_scales=tuple(guidance))))
    sampled: dict[tuple, str] = {}
    for w, st in sorted({(w, s0) for w in guidance} | {(g, st) for g, st, _ in grid},
                        key=lambda x: (x[0], x[1] != s0, x[1] or 0)):
        sampled[(w, st)], _ = timer(f"sample {setting_label(w, st)}", stage_sample, with_strength(cfg, w, st))
    sets = {w: sampled[(w, s0)] for w in guidance}

    teacher, filtered, mix_sets = None, {}, {}
    for g, st, t in sorted(set(grid) | {(w, s0, t0) for w in guidance},
                           key=lambda x: (x[0], x[1] is not None, x[1] or 0, x[2])):
        if t > 0:
            teacher = teacher or timer("teacher", stage_teacher, cfg)
            ct = replace(cfg, filter=replace(cfg.filter, tau=t))
            mix_sets[(g, st, t)], filtered[(g, st, t)] = timer(f"filter {setting_label(g, st, t)}", stage_filter, ct,
                                                                sampled[(g, st)], teacher)
        else:
            mix_sets[(g, st, t)] = sampled[(g, st)]
    return sets, mix_sets, filtered, teacher


# ----------------------------------------------------------------------------- the default run


def run_all(cfg: Config) -> tuple[dict, dict[float, str]]:
    """The default run (:func:`_run_all`) as one tracked parent run with a child per stage (``tracking.*``)."""
    with tracking.run(cfg, "run"):
        metrics, sets = _run_all(cfg)
        tracking.final(metrics)
        return metrics, sets


def _run_all(cfg: Config) -> tuple[dict, dict[float, str]]:
    """Ingest -> pretrain -> fine-tune -> sample (-> filter) -> evaluate -> sweep -> pseudo-label -> report.

    Returns the flat metrics (``metrics.json``) and the synthetic sets the report evaluated:
    guidance -> the sample config's set at that guidance, as sampled.

    Sampling runs once per (guidance, strength): the sample config's recipe at every
    guidance of the sweep, plus each ``sweep.strengths`` value; each set is filtered once per
    tau (``sweep.taus``, or ``filter.tau``) and the sweep mixes the filtered sets. The
    generator-quality rows measure the sample config's sets as sampled. The pseudo-label baseline
    runs when ``pseudolabel.enabled`` and the run has an unlabelled pool.

    The report and the sweep draw their plots with matplotlib into local files, so when
    ``results_dir`` is an object store they are written into a local temporary directory
    and uploaded under ``<results_dir>/<name>/`` once the run is done (``config.attempt.yaml`` is
    written there first, before any work, which also checks that the location is writable;
    ``config.yaml`` once the run succeeded).
    """
    from synthaug import report
    from synthaug.sweep import primary_strength, run_sweep, settings

    p = RunPaths(cfg)
    # This attempt's config first (which also checks the locations are writable);
    # config.yaml, the record of the run that made the outputs, only once it succeeded.
    dump_config(cfg, p.work, "config.attempt.yaml")
    dump_config(cfg, p.results, "config.attempt.yaml")
    staging = tempfile.mkdtemp(prefix="synthaug-results-") if storage.local_path(p.results) is None else None
    out = RunPaths(replace(cfg, results_dir=staging)) if staging else p  # where reports are drawn
    timer = Timer()
    timer("ingest", stage_ingest, cfg)
    if cfg.pretrain.data or is_complete(p.data("pool")):  # the unlabelled pool of a low-data run, or any corpus
        timer("pretrain", stage_pretrain, cfg)
    timer("finetune", stage_finetune, cfg)

    sets, mix_sets, filtered, teacher = synthetic_sets(cfg, timer)
    guidance = sorted(sets)
    s0, t0 = primary_strength(cfg), float(cfg.filter.tau)

    extractor = timer("extractor", stage_extractor, cfg)
    fidelity_rows = []
    for w, d in sets.items():
        m = timer(f"evaluate w={w:g}", stage_evaluate, cfg, p.data("val"), d, extractor, p.train_full(),
                  labelled_train=p.data("train"))
        fidelity_rows.append({"guidance_scale": w, **m})

    sweep_cfg = replace(cfg, sweep=replace(cfg.sweep, guidance_scales=tuple(guidance)))
    grid = set(settings(sweep_cfg))
    sweep = timer("sweep", run_sweep, sweep_cfg, p.data("train"), p.data("val"),
                  {k: v for k, v in mix_sets.items() if k in grid}, storage.join(out.results, "sweep"),
                  name=cfg.sweep.name, storage_dir=p.ray, test_dir=p.test())

    pseudo = None
    if cfg.pseudolabel.enabled and is_complete(p.data("pool")):
        teacher = teacher or timer("teacher", stage_teacher, cfg)
        w0 = float(cfg.sample.guidance_scale)
        combo = mix_sets[(w0, s0, t0)] if cfg.pseudolabel.with_synthetic else None
        pseudo = timer("pseudolabel", stage_pseudolabel, cfg, teacher=teacher, synthetic=combo,
                       ratio=report.headline_ratio(cfg.sweep.ratios))
    metrics = timer("report", report.write_run_report, cfg, out, fidelity_rows, sweep, sets, timer.seconds,
                    pseudo=pseudo, filtered=filtered)
    dump_config(cfg, out.results)
    tracking.artifacts(out.results)  # summary.md, metrics, plots, grids, the sweep's table
    if staging:
        storage.upload_dir(out.results, p.results)
        shutil.rmtree(staging, ignore_errors=True)
    dump_config(cfg, p.work)
    for d in (p.work, p.results):
        storage.delete(storage.join(d, "config.attempt.yaml"))
    return metrics, sets
