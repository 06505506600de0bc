"""The Python API: every ``synthaug <command>`` of a run as a function, for notebooks and scripts.

::

    import synthaug

    res = synthaug.run("jobs/configs/tiny.yaml", work_dir="/tmp/w", results_dir="/tmp/r")
    res.metrics["paired_gain_mean"], res.synthetic, res.generator
    more = synthaug.sample(res.config, sample={"guidance_scale": 1.0})

Each call takes a config (a :class:`~synthaug.config.Config`, a YAML path, or None for
the defaults) and overrides: the command line's dotted ``key=value`` strings, a mapping
of dotted keys (or of sections to mappings) to values, or the same as keywords
(``work_dir="/tmp/w"``, ``sample={"per_class": 4}``). Then it does what the command does,
in the same order, because the command is this code (``synthaug.cli`` parses, calls
:func:`check` and :meth:`Checked.run`, and prints): it checks every name and path the stage
uses, writes ``config.<stage>.attempt.yaml`` into the run's work directory, runs the
stage and replaces ``config.<stage>.yaml`` with the attempt once it succeeded.

Ray starts as under the CLI: each stage joins the running Ray, or the cluster at
``ray.address`` / ``RAY_ADDRESS``, or starts a local one with the config's ``ray`` section
(:func:`synthaug.raylocal.init_ray`), when it first needs Ray. In a notebook it stays up
between calls.

A bad input raises an :class:`~synthaug.errors.InputError` (possibly behind Ray's
wrappers: :func:`synthaug.errors.find_input_error`) whose first line is the one the CLI
prints. Each call returns a small frozen :class:`Result`: ``metrics`` (the flat figures
the command prints) and the locations it wrote.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence, Union

from synthaug import pipeline as P
from synthaug import storage
from synthaug.artifacts import is_complete, read_manifest
from synthaug.config import Config, absolute_locations, dump_config, load_config
from synthaug.errors import InputNotFound, InputValueError, find_input_error

ConfigLike = Union[Config, str, Path, None]
Overrides = Union[Sequence[str], Mapping[str, Any], None]

# The inputs (beyond the config) each stage takes: the CLI's path options, by the same names.
INPUTS: dict[str, tuple[str, ...]] = {
    "run": (), "ingest": (), "sweep": (), "study": ("command",),
    "pretrain": ("data", "out"),
    "finetune": ("data", "base", "out"),
    "sample": ("generator", "out"),
    "evaluate": ("real", "synthetic", "extractor", "train"),
    "classify": ("data", "real", "synthetic", "ratio", "synthetic_only"),
    "pseudolabel": ("data", "real", "pool", "synthetic", "ratio"),
    "filter": ("data", "real", "synthetic"),
}


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """What a call returns: the flat figures the CLI prints, and where the run lives."""

    config: Config = field(repr=False)  # the resolved config the stage ran with
    metrics: dict  # flat: names -> numbers or strings
    work_dir: str  # <work_dir>/<name>: datasets, generators, checkpoints, config records
    results_dir: str  # <results_dir>/<name>: reports


@dataclass(frozen=True)
class RunResult(Result):
    """``run``: metrics are ``metrics.json``; summary.md and the plots are in ``results_dir``."""

    datasets: dict  # split -> contract dataset (train, val, and pool / train_full in the low-data regime)
    generator: str  # the fine-tuned generator export
    synthetic: dict  # guidance -> the sample config's synthetic set at that guidance


@dataclass(frozen=True)
class IngestResult(Result):
    datasets: dict  # split -> contract dataset; metrics: split -> rows


@dataclass(frozen=True)
class GeneratorResult(Result):
    generator: str  # the export (diffusers layout + manifest.json)
    manifest: dict = field(repr=False)


@dataclass(frozen=True)
class SampleResult(Result):
    dataset: str  # the synthetic contract dataset
    manifest: dict = field(repr=False)


@dataclass(frozen=True)
class EvaluateResult(Result):
    """metrics: the one set's, or ``{"evaluated": n, "out": report dir}`` for several."""

    sets: dict  # synthetic set -> its flat metrics
    report_dir: str  # metrics*.json (and fidelity_vs_guidance.png for several sets)


@dataclass(frozen=True)
class ClassifyResult(Result):
    runs: list  # one dict per seed (top1, top5, n_train, ...)


@dataclass(frozen=True)
class SweepResult(Result):
    table: Any = field(repr=False)  # pandas DataFrame, one row per setting x ratio x seed; attrs["summary"]
    report_dir: str = ""  # sweep.csv, heatmap.png, summary.md


@dataclass(frozen=True)
class PseudoLabelResult(Result):
    dataset: str  # the pseudo-labelled pool rows (contract dataset)


@dataclass(frozen=True)
class FilterResult(Result):
    sets: dict  # synthetic set -> {"filtered": location, "kept": rows, "kept_per_class": {class: share}}


@dataclass(frozen=True)
class StudyResult(Result):
    """metrics: the headline k's arms; study.csv, study.json and study.md are in ``results_dir``."""


def _flat(d: dict) -> dict:
    return {k: v for k, v in d.items() if not isinstance(v, (dict, list))}


def _paths(cfg: Config) -> dict:
    p = P.RunPaths(cfg)
    return {"config": cfg, "work_dir": p.work, "results_dir": p.results}


# ----------------------------------------------------------------------------- config and checks


def load(config: ConfigLike = None, overrides: Overrides = None, **more: Any) -> Config:
    """The resolved config: ``config`` (a Config, a YAML path, or None for the defaults) with
    ``overrides`` and then ``more`` applied (see the module docstring); validated, and with every
    local location made absolute (:func:`synthaug.config.absolute_locations`)."""
    base = config if isinstance(config, Config) else None
    if base is None and config and not Path(config).is_file():
        raise InputNotFound(f"config file not found: {config}")  # a FileNotFoundError too
    cfg = load_config(None if base is not None else config, overrides or (), base=base)
    # Every local location absolute, once, here in the driver: tasks on other nodes get the same paths.
    return absolute_locations(load_config(None, more, base=cfg) if more else cfg)


@dataclass(frozen=True)
class Checked:
    """A stage whose config, names and paths are checked; :meth:`run` does the work."""

    stage: str
    config: Config
    inputs: dict

    def run(self, command: str | None = None) -> Result:
        """Hold the run directory's lease (:mod:`synthaug.lease`; refused while another live command
        holds it), write this attempt's config record, run the stage, then keep the record as the
        last success's. ``command``: how the lease names this command (the CLI passes its line)."""
        from synthaug.lease import held
        from synthaug.raylocal import check_cluster

        check_cluster(self.config)  # a local work_dir on a multi-node cluster: refused before any work
        work = P.RunPaths(self.config).work
        if command is None:  # a Python API call: the stage, and the program that made it
            command = f"synthaug.api.{self.stage}() in {shlex.join([os.path.basename(sys.argv[0] or 'python'), *sys.argv[1:]])}"
        with held(work, command):
            return self._run(work)

    def _run(self, work: str) -> Result:
        attempt = dump_config(self.config, work, f"config.{self.stage}.attempt.yaml")
        try:
            if self.stage in ("run", "study"):  # they open their own tracked parent run, with a child per stage
                result = _STAGES[self.stage](self.config, **self.inputs)
            else:
                from synthaug import tracking

                with tracking.run(self.config, self.stage):
                    result = _STAGES[self.stage](self.config, **self.inputs)
                    tracking.final(result.metrics)
        except BaseException as e:
            if find_input_error(e) is not None:  # refused for its input: this attempt's record goes (earlier ones stay)
                storage.delete(attempt)
            raise
        dump_config(self.config, work, f"config.{self.stage}.yaml")
        storage.delete(attempt)
        return result


def check(stage: str, config: ConfigLike = None, overrides: Overrides = None, *, inputs: dict | None = None,
          **more: Any) -> Checked:
    """Load the config and check every name and path ``stage`` uses, before any work (the CLI's
    ``--dry-run``); ``inputs``: the stage's path options (:data:`INPUTS`)."""
    if stage not in _STAGES:
        raise InputValueError(f"unknown stage {stage!r}; choose from {sorted(_STAGES)}")
    inputs = {k: v for k, v in (inputs or {}).items() if v is not None}
    unknown = sorted(set(inputs) - set(INPUTS[stage]))
    if unknown:
        raise TypeError(f"{stage}: unexpected inputs {unknown}; it takes {list(INPUTS[stage])}")
    for k in ("data", "out", "base", "generator", "real", "extractor", "train", "pool"):
        if k in inputs:
            inputs[k] = storage.absolute(inputs[k])  # resolved here, once: tasks on other nodes see the same paths
    if "synthetic" in inputs:
        syn = inputs["synthetic"]
        inputs["synthetic"] = [storage.absolute(s) for s in ([syn] if isinstance(syn, (str, Path)) else syn)]
    from synthaug.checks import check_inputs

    cfg = load(config, overrides, **more)
    check_inputs(cfg, stage, SimpleNamespace(**inputs))
    return Checked(stage, cfg, inputs)


def _call(stage: str, config: ConfigLike, overrides: Overrides, more: dict, **inputs: Any) -> Any:
    return check(stage, config, overrides, inputs=inputs, **more).run()


# ----------------------------------------------------------------------------- the calls


def run(config: ConfigLike = None, overrides: Overrides = None, **more: Any) -> RunResult:
    """The whole default pipeline (``synthaug run``): ingest, pretrain, fine-tune, sample,
    evaluate, sweep, pseudo-label and the report in ``results_dir``."""
    return _call("run", config, overrides, more)


def study(config: ConfigLike = None, overrides: Overrides = None, *, command: str | None = None,
          **more: Any) -> StudyResult:
    """The recipe's arms over ``study.k_per_class`` x ``study.draws`` x seeds (``synthaug study``);
    ``command`` is how study.md says the study was run (default: this call)."""
    return _call("study", config, overrides, more, command=command)


def ingest(config: ConfigLike = None, overrides: Overrides = None, **more: Any) -> IngestResult:
    """Real images -> contract datasets (``train``, ``val``; ``pool``, ``train_full`` in the low-data regime)."""
    return _call("ingest", config, overrides, more)


def pretrain(config: ConfigLike = None, overrides: Overrides = None, *, data=None, out=None,
             **more: Any) -> GeneratorResult:
    """Unconditional generator pretraining on the unlabelled pool (or ``data``)."""
    return _call("pretrain", config, overrides, more, data=data, out=out)


def finetune(config: ConfigLike = None, overrides: Overrides = None, *, data=None, base=None, out=None,
             **more: Any) -> GeneratorResult:
    """Class-conditional fine-tuning from ``base`` (default: ``finetune.base``, or this run's pretrained export)."""
    return _call("finetune", config, overrides, more, data=data, base=base, out=out)


def sample(config: ConfigLike = None, overrides: Overrides = None, *, generator=None, out=None,
           **more: Any) -> SampleResult:
    """Class-balanced sampling from the run's fine-tuned generator (or ``generator``) into a keyed set."""
    return _call("sample", config, overrides, more, generator=generator, out=out)


def evaluate(config: ConfigLike = None, overrides: Overrides = None, *, synthetic, real=None, extractor=None,
             train=None, **more: Any) -> EvaluateResult:
    """FID / IS / KID / PR, per-class FID, CAS (and the near-copy audit against ``train``) of each synthetic set."""
    return _call("evaluate", config, overrides, more, synthetic=synthetic, real=real, extractor=extractor, train=train)


def classify(config: ConfigLike = None, overrides: Overrides = None, *, data=None, real=None, synthetic=None,
             ratio: float = 1.0, synthetic_only: bool = False, **more: Any) -> ClassifyResult:
    """Classifiers on a real / synthetic mix (``ratio`` synthetic:real; real only without ``synthetic``), every seed."""
    return _call("classify", config, overrides, more, data=data, real=real, synthetic=synthetic, ratio=ratio,
                 synthetic_only=synthetic_only)


def sweep(config: ConfigLike = None, overrides: Overrides = None, **more: Any) -> SweepResult:
    """Ray Tune over the synthetic settings x mixing ratios x seeds (sampling what is missing)."""
    return _call("sweep", config, overrides, more)


def pseudolabel(config: ConfigLike = None, overrides: Overrides = None, *, data=None, real=None, pool=None,
                synthetic=None, ratio: float = 1.0, **more: Any) -> PseudoLabelResult:
    """The pseudo-label baseline: a real-only teacher labels the pool; students train on both."""
    return _call("pseudolabel", config, overrides, more, data=data, real=real, pool=pool, synthetic=synthetic,
                 ratio=ratio)


def filter(config: ConfigLike = None, overrides: Overrides = None, *, synthetic, data=None, real=None,  # noqa: A001
           **more: Any) -> FilterResult:
    """Each synthetic set filtered by the real-only teacher's confidence (``filter.tau``)."""
    return _call("filter", config, overrides, more, synthetic=synthetic, data=data, real=real)


# ----------------------------------------------------------------------------- the stages, checked


def _run(cfg: Config) -> RunResult:
    metrics, sets = P.run_all(cfg)
    p = P.RunPaths(cfg)
    datasets = {s: p.data(s) for s in ("train", "val", "pool", "train_full") if is_complete(p.data(s))}
    return RunResult(**_paths(cfg), metrics=_flat(metrics), datasets=datasets, generator=p.generator("finetune"),
                     synthetic=dict(sets))


def _study(cfg: Config, command: str | None = None) -> StudyResult:
    from synthaug.study import run_study

    flat = run_study(cfg, command=command or f"synthaug.api.study(name={cfg.name!r})")
    return StudyResult(**{**_paths(cfg), "results_dir": flat["study"]}, metrics=_flat(flat))


def _ingest(cfg: Config) -> IngestResult:
    manifests = P.stage_ingest(cfg)
    p = P.RunPaths(cfg)
    return IngestResult(**_paths(cfg), metrics={k: m["num_rows"] for k, m in manifests.items()},
                        datasets={k: p.data(k) for k in manifests})


def _generator(stage: str, cfg: Config, data=None, base=None, out=None) -> GeneratorResult:
    m = P.stage_pretrain(cfg, data, out) if stage == "pretrain" else P.stage_finetune(cfg, data, base, out)
    return GeneratorResult(**_paths(cfg), metrics=_flat(m), generator=str(out or P.RunPaths(cfg).generator(stage)),
                           manifest=m)


def _sample(cfg: Config, generator=None, out=None) -> SampleResult:
    loc, manifest = P.stage_sample(cfg, generator, out)
    return SampleResult(**_paths(cfg), metrics=_flat({"dataset": str(loc), **manifest}), dataset=str(loc),
                        manifest=manifest)


def _evaluate(cfg: Config, synthetic: list, real=None, extractor=None, train=None) -> EvaluateResult:
    """Metrics for each synthetic set into <results>/<name>/evaluate/."""
    from synthaug import report
    from synthaug.raylocal import init_ray

    p = P.RunPaths(cfg)
    real = real or p.data("val")
    if not synthetic:
        raise InputValueError("synthaug evaluate: give at least one --synthetic <dataset dir>")
    init_ray(cfg.ray)  # with --extractor, the feature pass would otherwise start Ray without the config's section
    extractor = extractor or P.stage_extractor(cfg)
    labelled_train = p.data("train") if is_complete(p.data("train")) else None
    rows = {}
    for d in synthetic:
        m = P.stage_evaluate(cfg, real, d, extractor, train, labelled_train=labelled_train)
        flat = _flat(m)
        flat["guidance_scale"] = float(read_manifest(d).get("sample", {}).get("guidance_scale", float("nan")))
        rows[d] = flat
    out = storage.join(str(p.results), "evaluate")
    for i, r in enumerate(rows.values()):
        report.write_metrics(out, r, name=f"metrics_{i}" if len(rows) > 1 else "metrics")
    if len(rows) > 1:
        report.plot_vs_guidance([{**r, "cas": r.get("cas_top1_mean"), "cas_std": r.get("cas_top1_std")}
                                 for r in rows.values()], storage.join(out, "fidelity_vs_guidance.png"))
    metrics = next(iter(rows.values())) if len(rows) == 1 else {"evaluated": len(rows), "out": str(out)}
    return EvaluateResult(**_paths(cfg), metrics=metrics, sets=rows, report_dir=str(out))


def _classify(cfg: Config, data=None, real=None, synthetic: list | None = None, ratio: float = 1.0,
              synthetic_only: bool = False) -> ClassifyResult:
    """One mix, every seed, through Ray Train; mean and std of top-1.

    The mixtures are planned from the datasets' locations (all checks before any
    training); the workers stream the rows.
    """
    from synthaug.classify.mixing import plan_mixture
    from synthaug.classify.train import fit

    p = P.RunPaths(cfg)
    train_dir = str(data or p.data("train"))
    m = read_manifest(train_dir)
    syn = str(synthetic[0]) if synthetic else None
    specs = [plan_mixture(train_dir, syn, ratio if syn is not None else 0.0, int(seed), synthetic_only=synthetic_only)
             for seed in cfg.classify.seeds]
    runs = []
    for seed, spec in zip(cfg.classify.seeds, specs):
        runs.append(fit(cfg.classify, spec, str(real or p.data("val")), seed=int(seed), out_dir=storage.join(p.work, "classify"),
                        name=f"r{ratio:g}-{'syn' if synthetic_only else 'mix'}-seed{seed}", class_names=m["class_names"],
                        in_chans=int(m["channels"]), ray_cfg=cfg.ray, test_dir=p.test()))
    metrics = {**_mean_std("top1", runs), "seeds": len(runs), "n_train": runs[0]["n_train"]}
    if p.test():  # the reported split (nothing is chosen on it)
        metrics.update(_mean_std("test_top1", runs))
    return ClassifyResult(**_paths(cfg), metrics=metrics, runs=runs)


def _sweep(cfg: Config) -> SweepResult:
    """Sample each (guidance, strength) and filter each tau once (reused by content hash),
    then Ray Tune over the settings x ratios x seeds."""
    from synthaug.sweep import run_sweep, settings

    p = P.RunPaths(cfg)
    _, mix_sets, _, _ = P.synthetic_sets(cfg, headline=False)
    grid = set(settings(cfg))
    out = storage.join(p.results, cfg.sweep.name)
    df = run_sweep(cfg, p.data("train"), p.data("val"), {k: v for k, v in mix_sets.items() if k in grid}, out,
                   name=cfg.sweep.name, storage_dir=p.ray, test_dir=p.test())
    return SweepResult(**_paths(cfg), metrics=_flat(df.attrs["summary"]), table=df, report_dir=str(out))


def _mean_std(column: str, runs: list[dict]) -> dict:
    """``<column>_mean`` and ``<column>_std`` over seeds (``synthaug.stats``; std None for one seed)."""
    from synthaug.stats import mean_std

    m, sd = mean_std(r.get(column) for r in runs)
    return {f"{column}_mean": m, f"{column}_std": None if sd != sd else sd}


def _pseudolabel(cfg: Config, data=None, real=None, pool=None, synthetic: list | None = None,
                 ratio: float = 1.0) -> PseudoLabelResult:
    """Teacher, pseudo-labelled pool, students; paired with real-only by seed.

    Real-only runs are those of ``classify(ratio=0)`` (same keys, same place), so either
    call reuses the other's.
    """
    from synthaug.classify.pseudolabel import real_only_runs

    p = P.RunPaths(cfg)
    train, val = str(data or p.data("train")), str(real or p.data("val"))
    teacher = P.stage_teacher(cfg, train, val)
    res = P.stage_pseudolabel(cfg, train, val, pool, teacher=teacher, synthetic=synthetic[0] if synthetic else None,
                              ratio=ratio)
    from synthaug.stats import paired

    # Reported on test when the run has one (recipes are chosen on val), else on val.
    split, column = ("test", "test_top1") if p.test() else ("val", "top1")
    real = {r["seed"]: r[column] for r in real_only_runs(cfg, train, val, storage.join(p.work, "classify"), test=p.test())}
    out = {"dataset": res["dataset"], "n_pseudo": res["n_pseudo"], "pool_rows": res["pool_rows"],
           "kept_share": res["kept_share"], "teacher_top1": res["teacher_top1"], "report_split": split}
    out.update({k.replace(column, "real_only_top1"): v for k, v in _mean_std(column, [{column: v} for v in real.values()]).items()})
    for name in ("students", "combined"):
        if name not in res:
            continue
        tag = "pseudo_label" if name == "students" else "pseudo_plus_synthetic"
        out.update({k.replace(column, f"{tag}_top1"): v for k, v in _mean_std(column, res[name]).items()})
        g = paired(r[column] - real[r["seed"]] for r in res[name])
        out.update({f"{tag}_gain_mean": g["mean"], f"{tag}_gain_std": None if g["std"] != g["std"] else g["std"],
                    f"{tag}_gain_ci95": g["ci95"]})
    return PseudoLabelResult(**_paths(cfg), metrics=out, dataset=str(res["dataset"]))


def _filter(cfg: Config, synthetic: list | None = None, data=None, real=None) -> FilterResult:
    """Each synthetic set filtered by the teacher; the share kept per class."""
    from synthaug.classify.pseudolabel import kept_per_class

    if not synthetic:
        raise InputValueError("synthaug filter: give at least one --synthetic <dataset dir>")
    if cfg.filter.tau <= 0:
        raise InputValueError("synthaug filter: config key 'filter.tau' is 0 (off); set e.g. filter.tau=0.5")
    p = P.RunPaths(cfg)
    teacher = P.stage_teacher(cfg, str(data or p.data("train")), str(real or p.data("val")))
    sets = {}
    for d in synthetic:
        loc, m = P.stage_filter(cfg, d, teacher)
        sets[str(d)] = {"filtered": loc, "kept": m["num_rows"], "kept_per_class": kept_per_class(m)}
    return FilterResult(**_paths(cfg), metrics={"sets": len(sets), "kept": sum(v["kept"] for v in sets.values())},
                        sets=sets)


_STAGES = {
    "run": _run, "study": _study, "ingest": _ingest,
    "pretrain": lambda cfg, **kw: _generator("pretrain", cfg, **kw),
    "finetune": lambda cfg, **kw: _generator("finetune", cfg, **kw),
    "sample": _sample, "evaluate": _evaluate, "classify": _classify, "sweep": _sweep,
    "pseudolabel": _pseudolabel, "filter": _filter,
}


def to_json(result: Result) -> str:
    """The figures as the CLI prints them."""
    return json.dumps(result.metrics, indent=2, default=str)
