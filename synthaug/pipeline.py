"""The stages wired together: where each reads and writes, and the end-to-end default run.

Run layout (``work_dir`` is git-ignored; ``results_dir`` holds what a reader looks at)::

    <work_dir>/<name>/config.yaml            the resolved config, dumped before any work
    <work_dir>/<name>/data/{train,val,pool,train_full}/   ingest (contract datasets)
    <work_dir>/<name>/generators/{pretrain,finetune}/     generator exports
    <work_dir>/<name>/ray/                   Ray Train / Tune storage (checkpoints)
    <work_dir>/<name>/extractor/             in-domain feature extractor (classifier)
    <work_dir>/samples/<key>/                sampled sets, keyed by content (shared by runs)
    <results_dir>/<name>/                    metrics.json, summary.md, plots, grids, sweep table
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from synthaug.artifacts import atomic_write_json, read_manifest, read_table
from synthaug.config import Config, dump_config, replace, to_dict


@dataclass(frozen=True)
class RunPaths:
    """Every path a run reads or writes, derived from the config alone."""

    cfg: Config

    @property
    def work(self) -> Path:
        return Path(self.cfg.work_dir) / self.cfg.name

    @property
    def results(self) -> Path:
        return Path(self.cfg.results_dir) / self.cfg.name

    def data(self, split: str) -> Path:
        return self.work / "data" / split

    def generator(self, stage: str) -> Path:
        return self.work / "generators" / stage

    @property
    def ray(self) -> Path:
        return (self.work / "ray").absolute()

    @property
    def extractor(self) -> Path:
        return self.work / "extractor" / "model"

    @property
    def cache(self) -> Path:
        return Path(self.cfg.work_dir) / "cache"


class Timer:
    """Collects wall-clock seconds per stage for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.time() - t0, 1)
        print(f"=== {name} done in {self.seconds[name]}s ===", flush=True)
        return out


# ----------------------------------------------------------------------------- stages


def stage_ingest(cfg: Config) -> dict:
    from synthaug.data import ingest

    return ingest.run(cfg, RunPaths(cfg).work / "data")


def stage_pretrain(cfg: Config, data: str | Path | None = None, out: str | Path | None = None) -> dict:
    """Unconditional pretraining on the unlabelled pool (labels = null class)."""
    from synthaug.generative import finetune

    p = RunPaths(cfg)
    return finetune.run(cfg, "pretrain", data or p.data("pool"), out or p.generator("pretrain"), p.ray,
                        unconditional=True)


def stage_finetune(cfg: Config, data: str | Path | None = None, base: str | Path | None = None,
                   out: str | Path | None = None) -> dict:
    """Class-conditional fine-tuning from ``base`` (config, argument, or this run's pretrained export)."""
    from synthaug.generative import finetune

    p = RunPaths(cfg)
    if base is None and not cfg.finetune.base and (p.generator("pretrain") / "manifest.json").is_file():
        base = p.generator("pretrain")
    return finetune.run(cfg, "finetune", data or p.data("train"), out or p.generator("finetune"), p.ray, base_dir=base)


def stage_sample(cfg: Config, generator: str | Path | None = None, out: str | Path | None = None) -> tuple[Path, dict]:
    from synthaug.generative import sample

    return sample.run(cfg, generator or RunPaths(cfg).generator("finetune"), out)


def stage_extractor(cfg: Config) -> Path:
    """The in-domain feature extractor: a classifier trained on the whole real train split."""
    from synthaug.classify.train import fit

    p = RunPaths(cfg)
    train_dir = p.data("train_full") if (p.data("train_full") / "manifest.json").is_file() else p.data("train")
    if (p.extractor / "classifier.json").is_file():
        return p.extractor
    m = read_manifest(train_dir)
    ccfg = replace(cfg.classify, epochs=cfg.evaluate.extractor_epochs, num_workers=1)
    fit(ccfg, read_table(train_dir), p.data("val"), seed=0, out_dir=p.extractor.parent, name="extractor",
        class_names=m["class_names"], in_chans=m["channels"], ray_cfg=cfg.ray, save_model=True)
    return p.extractor


def stage_evaluate(cfg: Config, real: str | Path, synthetic: str | Path, extractor: str | Path,
                   train: str | Path | None = None) -> dict:
    """Fidelity metrics (torch-fidelity, in-domain extractor) and the near-copy audit of one set."""
    from synthaug.evaluate import fidelity, memorization

    p = RunPaths(cfg)
    metrics = fidelity.compute_fidelity(real, synthetic, extractor, cfg.evaluate, p.cache)
    if train is not None:
        audit = memorization.near_copy_audit(train, real, synthetic, fidelity.feature_fn(extractor),
                                             percentile=cfg.evaluate.near_copy_percentile)
        metrics.update({k: v for k, v in audit.items() if not isinstance(v, (list, dict))})
        metrics["_audit"] = audit
    return metrics


# ----------------------------------------------------------------------------- the default run


def run_all(cfg: Config) -> dict:
    """Ingest -> pretrain -> fine-tune -> sample -> evaluate -> classifiers -> sweep -> report."""
    from synthaug import report
    from synthaug.sweep import run_sweep

    p = RunPaths(cfg)
    dump_config(cfg, p.work)
    dump_config(cfg, p.results)
    timer = Timer()
    timer("ingest", stage_ingest, cfg)
    timer("pretrain", stage_pretrain, cfg)
    timer("finetune", stage_finetune, cfg)

    # Sample once per guidance value; the sweep and the evaluation reuse these sets.
    sets: dict[float, Path] = {}
    for w in sorted({float(x) for x in cfg.sweep.guidance_scales} | {float(cfg.sample.guidance_scale)}):
        cw = replace(cfg, sample=replace(cfg.sample, guidance_scale=w))
        sets[w], _ = timer(f"sample w={w:g}", stage_sample, cw)

    extractor = timer("extractor", stage_extractor, cfg)
    fidelity_rows = []
    for w, d in sets.items():
        m = timer(f"evaluate w={w:g}", stage_evaluate, cfg, p.data("val"), d, extractor, p.data("train_full"))
        fidelity_rows.append({"guidance_scale": w, **m})

    sweep_cfg = replace(cfg, sweep=replace(cfg.sweep, guidance_scales=tuple(sorted(sets))))
    sweep = timer("sweep", run_sweep, sweep_cfg, p.data("train"), p.data("val"), sets, p.results / "sweep", name="sweep")
    return timer("report", report.write_run_report, cfg, p, fidelity_rows, sweep, sets, timer.seconds)
