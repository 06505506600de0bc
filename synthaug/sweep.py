"""Ray Tune sweep over synthetic-set setting x mixing ratio x seed, reusing already-sampled sets.

A *setting* is how a synthetic set was made: its guidance scale, its image-to-image
strength (``None`` for text-to-image) and its confidence-filter threshold tau (0 =
unfiltered); :func:`settings` lists the grid's (``sweep.guidance_scales`` x
``sweep.strengths`` x ``sweep.taus``; an empty axis is the sample / filter config's one
value). Sampling happens once per (guidance, strength) and filtering once per tau in
earlier stages; ``synthetic_dirs`` maps each setting (a ``(guidance, strength, tau)``
tuple, or just a guidance value for the config's strength and tau) to its contract
dataset, and trials only read and mix. One trial is one
classifier run: ``plan_mixture(real, synthetic, ratio, seed)`` from the locations (no
table passes through the driver or the trial), train on the streamed mixture (the
training function called in the trial for one worker, a ``TorchTrainer`` inside the trial
for more), report top-1/top-5 on the real val split each epoch.

Ratio 0 is real-only training, which does not depend on guidance: it runs once per seed
(a trial with ``guidance=None``) and its result is repeated in every guidance row of the
table, marked ``shared_real_only=True``; the paired gains below compare against it.

Outputs in ``out_dir``: ``sweep.csv`` / ``sweep.parquet`` (one row per setting x ratio x
seed, with ``guidance``, ``strength``, ``tau`` and the ``setting`` label), ``heatmap.png``
(mean top-1 over setting x ratio), ``accuracy_vs_ratio.png`` (mean +- std over seeds, one
line per setting), ``summary.md`` / ``summary.json``. The
Tune experiment lives in ``<storage>/<name>-<key[:12]>``, keyed by :func:`experiment`
(the grid, the classifier config and the inputs' content hashes): running the same sweep
again restores it and runs only the trials that are missing or errored; a changed grid,
config or input is a new experiment.

A confidence-filtered set (tau > 0) keeps a data-dependent number of images per class, so it
may be unable to give a ratio's r x n_c images of some class: those (setting, ratio) cells
are left out of the grid (:func:`short_cells`), named with the class and the counts in
``summary.md`` and ``df.attrs["skipped"]``. An unfiltered set that is too small for the
grid is a config error and stops the sweep before any trial.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from synthaug import console, identity, storage, tracking
from synthaug.artifacts import atomic_write_json, atomic_write_text, read_manifest
from synthaug.classify.mixing import per_class_counts
from synthaug.config import Config, dump_config
from synthaug.errors import InputValueError
from synthaug.stats import excludes_zero, paired, report_split, verdict

TABLE_COLUMNS = ("guidance", "strength", "tau", "setting", "ratio", "seed", "top1", "top5", "epochs", "seconds",
                 "trial_id", "shared_real_only", "test_top1")


# ----------------------------------------------------------------------------- settings


def primary_strength(cfg: Config) -> float | None:
    """The sample config's strength: ``sample.strength`` for image-to-image, None for text-to-image."""
    return float(cfg.sample.strength) if cfg.sample.init == "real" else None


def settings(cfg: Config) -> list[tuple[float, float | None, float]]:
    """The grid's synthetic-set settings ``(guidance, strength, tau)``, in config order.

    An empty ``sweep.strengths`` is the sample config's init and strength; an empty
    ``sweep.taus`` is ``filter.tau``.
    """
    strengths = [None if x is None else float(x) for x in cfg.sweep.strengths] or [primary_strength(cfg)]
    taus = [float(t) for t in cfg.sweep.taus] or [float(cfg.filter.tau)]
    return [(float(g), st, t) for g in cfg.sweep.guidance_scales for st in strengths for t in taus]


def setting_label(guidance: float, strength: float | None = None, tau: float = 0.0) -> str:
    """``w=2``, ``w=2 s=0.3``, ``w=2 s=0.3 tau=0.8``: a setting's name in tables and plots."""
    return " ".join([f"w={float(guidance):g}", *([f"s={float(strength):g}"] if strength is not None else []),
                     *([f"tau={float(tau):g}"] if tau else [])])


def _as_setting(key, cfg: Config) -> tuple[float, float | None, float]:
    if isinstance(key, tuple):
        g, st, t = key
        return float(g), None if st is None else float(st), float(t)
    return float(key), primary_strength(cfg), float(cfg.filter.tau)  # a guidance value: the config's recipe


def _key_label(key, cfg: Config) -> str:
    """A ``synthetic_dirs`` key (a setting label, a setting or a guidance value) as its label."""
    return key if isinstance(key, str) else setting_label(*_as_setting(key, cfg))


def _same(a: tuple, b: tuple) -> bool:
    close = lambda x, y: (x is None and y is None) or (  # noqa: E731
        x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12))
    return all(close(x, y) for x, y in zip(a, b))


def _lookup(synthetic_dirs: dict, setting: tuple, cfg: Config):
    """The dir for ``setting`` (keys are settings or guidance values, compared as floats), or None."""
    for key, path in synthetic_dirs.items():
        if _same(_as_setting(key, cfg), setting):
            return path
    return None


def validate_inputs(cfg: Config, real_train_dir, val_dir, synthetic_dirs: dict) -> dict[str, str]:
    """Check the grid and every input before any trial; returns setting label -> absolute synthetic dir."""
    w, c = cfg.sweep, cfg.classify
    if not w.guidance_scales or not w.ratios or not c.seeds:
        raise InputValueError(
            "empty sweep grid: 'sweep.guidance_scales', 'sweep.ratios' and 'classify.seeds' must each "
            f"list at least one value (got {list(w.guidance_scales)}, {list(w.ratios)}, {list(c.seeds)})"
        )
    for r in w.ratios:
        if not float(r) >= 0:
            raise InputValueError(f"config key 'sweep.ratios': ratio {r} < 0")
    real = read_manifest(real_train_dir)
    val = read_manifest(val_dir)
    if val["class_names"] != real["class_names"]:
        raise InputValueError(f"val_dir {val_dir}: class names {val['class_names']} != real train's {real['class_names']}")
    max_ratio = max(float(r) for r in w.ratios)
    dirs: dict[str, str] = {}
    for setting in settings(cfg):
        if max_ratio == 0:
            break  # real-only grid: no synthetic set is read
        g, tag = setting[0], setting_label(*setting)
        what = f"guidance {g}" if setting_label(*_as_setting(g, cfg)) == tag else tag
        path = _lookup(synthetic_dirs, setting, cfg)
        if path is None:
            have = sorted(setting_label(*_as_setting(k, cfg)) for k in synthetic_dirs)
            raise InputValueError(
                f"no synthetic dataset for {what} (config keys 'sweep.guidance_scales', 'sweep.strengths', "
                f"'sweep.taus'); synthetic_dirs has {have}"
            )
        m = read_manifest(path)  # raises naming the dir when missing or incomplete
        if m["class_names"] != real["class_names"]:
            raise InputValueError(
                f"synthetic dataset {path} ({what}): class names {m['class_names']} do not match "
                f"the real class names {real['class_names']}"
            )
        short = None if setting[2] > 0 else shortfall(real, m, max_ratio)  # filtered sets: see short_cells
        if short:
            raise InputValueError(f"synthetic dataset {path} ({what}): {_short_text(short, max_ratio)}")
        dirs[tag] = storage.absolute(str(path))
    return dirs


def shortfall(real: dict, synthetic: dict, ratio: float) -> tuple[str, int, int] | None:
    """``(class, has, needs)`` of the first class for which a set (its manifest) has fewer than
    ``ratio`` x the real count (``real``: the real set's manifest), or None when it has enough."""
    names = list(real["counts"])
    labels = np.repeat(np.arange(len(names)), [real["counts"][n] for n in names])
    for label, need in per_class_counts(labels, ratio).items():
        have = int(synthetic["counts"].get(names[label], 0))
        if need > have:
            return names[label], have, int(need)
    return None


def _short_text(short: tuple[str, int, int], ratio: float) -> str:
    name, have, need = short
    return f"class {name!r} has {have} images, ratio {ratio} needs {need}"


def short_cells(cfg: Config, real_train_dir, dirs: dict[str, str]) -> dict[tuple[str, float], str]:
    """The grid's ``(setting label, ratio)`` cells whose filtered set is too small, with the reason.

    ``dirs``: setting label -> set, as :func:`validate_inputs` returns it. Only filtered sets
    (tau > 0) are judged here: how many images they keep depends on the teacher.
    """
    real = read_manifest(real_train_dir)
    ratios = sorted({float(r) for r in cfg.sweep.ratios} - {0.0})
    out = {}
    for setting in settings(cfg):
        tag = setting_label(*setting)
        if setting[2] > 0 and tag in dirs:
            m = read_manifest(dirs[tag])
            out.update({(tag, r): _short_text(short, r) for r in ratios if (short := shortfall(real, m, r))})
    return out


# ----------------------------------------------------------------------------- trials


def _trial(config: dict, *, tracked: dict | None = None, **kw) -> None:
    """One Tune trial, tracked as a child of the sweep's run (``tracked``: its ``tracking.handle``)."""
    import ray.tune

    from synthaug.raylocal import data_context

    console.quiet()
    data_context()  # the trial plans its mixture with Ray Data: no progress bars in a log
    cell = config["cell"]
    name = f"trial-{ray.tune.get_context().get_trial_id()} {cell['setting'] or 'real only'} r={cell['ratio']:g} seed={config['seed']}"
    with tracking.trial(tracked, name, config):
        _train_trial(config, **kw)


def _train_trial(config: dict, *, cfg: Config, real_dir: str, val_dir: str, synthetic_dirs: dict, class_names: list,
                 in_chans: int, train_dir: str, test_dir: str | None = None) -> None:
    """Plan the trial's mixture from locations, then train in this process (1 worker) or a TorchTrainer (N)."""
    import ray.tune

    from synthaug.classify.mixing import plan_mixture
    from synthaug.classify.train import fit, fit_local

    cell, seed = config["cell"], int(config["seed"])
    ratio = float(cell["ratio"])
    synthetic = synthetic_dirs[cell["setting"]] if ratio > 0 else None
    train = plan_mixture(real_dir, synthetic, ratio, seed)  # a small spec; the rows are streamed by the workers
    kw = dict(seed=seed, class_names=class_names, in_chans=in_chans, test_dir=test_dir)
    if cfg.classify.num_workers == 1:
        fit_local(cfg.classify, train, val_dir, reporter="tune", **kw)
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        # The Train run is named by trial, so a restored trial resumes its Train run.
        name = f"train-{ray.tune.get_context().get_trial_id()}"
        fit(cfg.classify, train, val_dir, out_dir=train_dir, name=name, callbacks=[TuneReportCallback()], **kw)


def _grid(cfg: Config, skip=()) -> list[dict]:
    """Tune cells: real-only once (setting None), then every setting x positive ratio but the
    ``skip`` ones (``(setting label, ratio)``: :func:`short_cells`)."""
    ratios = sorted({float(r) for r in cfg.sweep.ratios})
    cells = [{"guidance": None, "strength": None, "tau": None, "setting": None, "ratio": 0.0}] if 0.0 in ratios else []
    cells += [{"guidance": g, "strength": st, "tau": t, "setting": setting_label(g, st, t), "ratio": r}
              for g, st, t in settings(cfg) for r in ratios if r > 0 and (setting_label(g, st, t), r) not in skip]
    return cells


def _tuner(cfg: Config, trainable, store: str, name: str, fingerprint: dict, asha: bool):
    """A new Tuner, or the restored one when this experiment exists (only missing trials run).

    ``store`` is any location (local, shared, ``s3://``): Tune storage via ``storage.ray_storage``.
    """
    from ray import tune

    ray_store = storage.ray_storage(store)
    exp_dir = storage.join(store, name)
    exp_path = storage.resolve(exp_dir)[1] if storage.is_uri(exp_dir) else exp_dir
    fs_kw = {"storage_filesystem": ray_store["storage_filesystem"]} if "storage_filesystem" in ray_store else {}
    if storage.exists(exp_dir) and tune.Tuner.can_restore(exp_path, **fs_kw):
        tracking.reused("sweep", fingerprint["hash"], exp_dir)  # only its missing or errored trials run
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, **fs_kw)
    atomic_write_json(storage.join(store, f"{name}.{identity.RECORD}"),
                      {"stage": "sweep", "key": fingerprint["hash"], "inputs": fingerprint})
    seeds = [int(s) for s in cfg.classify.seeds]
    if asha:
        from ray.tune.schedulers import ASHAScheduler

        sched = ASHAScheduler(metric="top1", mode="max", max_t=cfg.classify.epochs, grace_period=1)
        tune_cfg = tune.TuneConfig(scheduler=sched, max_concurrent_trials=cfg.sweep.max_concurrent)
    else:
        tune_cfg = tune.TuneConfig(metric="top1", mode="max", max_concurrent_trials=cfg.sweep.max_concurrent)
    tune_cfg.trial_dirname_creator = lambda trial: f"trial-{trial.trial_id}"
    # A finished trial's process runs the next one (every trial asks for the same resources):
    # one process per concurrent trial, not one per trial, each importing torch and timm anew.
    tune_cfg.reuse_actors = True
    return tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(fingerprint["grid"]), "seed": tune.grid_search(seeds)},
        tune_config=tune_cfg,
        run_config=tune.RunConfig(
            name=name,
            verbose=None if console.verbose() else 0,  # Tune's console table only with --verbose
            **ray_store,
            failure_config=tune.FailureConfig(max_failures=cfg.classify.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def experiment(cfg: Config, real_train_dir, val_dir, synthetic_dirs: dict, name: str = "sweep",
               asha: bool = False, skip=(), test_dir=None) -> tuple[str, dict]:
    """The sweep's keyed experiment name ``<name>-<key[:12]>`` and what the key covers.

    The key (``synthaug.identity``) covers the grid, the seeds, every result-changing
    ``classify`` field and the content hashes of the real train, val and synthetic sets:
    the same sweep resumes its experiment, a changed one starts its own.
    """
    fingerprint = {
        "grid": _grid(cfg, skip), "seeds": [int(s) for s in cfg.classify.seeds],
        "classify": identity.config_fields("classify", cfg.classify),
        "real": identity.dataset_hash(str(real_train_dir)), "val": identity.dataset_hash(str(val_dir)),
        "synthetic": {_key_label(k, cfg): identity.dataset_hash(str(p)) for k, p in synthetic_dirs.items()}, "asha": asha,
    }
    if test_dir:  # only then: sweeps without a test split keep their keys
        fingerprint["test"] = identity.dataset_hash(str(test_dir))
    key = identity.artifact_key("sweep", fingerprint["classify"], {k: v for k, v in fingerprint.items() if k != "classify"})
    return identity.run_name(name, key), {"hash": key, **fingerprint}


def run_sweep(
    cfg: Config,
    real_train_dir,
    val_dir,
    synthetic_dirs: dict,
    out_dir,
    name: str = "sweep",
    *,
    asha: bool = False,
    storage_dir=None,
    test_dir=None,
) -> pd.DataFrame:
    """Run (or resume) the sweep; returns the table, with the summary dict in ``df.attrs["summary"]``.

    ``asha`` stops weak trials early (ASHA on top-1, one rung per epoch). ASHA decides per
    trial, so seeds of one cell can stop at different epochs; stopped trials keep the
    epochs they ran in the ``epochs`` column and the summary counts them.

    ``storage_dir`` holds the Tune experiment (trial checkpoints; default ``out_dir``); keep
    it out of a committed results directory. ``test_dir``: a test split each trial evaluates
    once with its final weights (``test_top1``); the best cell is chosen on val and its gain
    reported on test.
    """
    from ray import tune

    from synthaug.raylocal import init_ray

    # Check everything before any trial starts, and write the resolved config first.
    dirs = validate_inputs(cfg, real_train_dir, val_dir, synthetic_dirs)
    skip = short_cells(cfg, real_train_dir, dirs)
    for (tag, r), why in skip.items():
        print(f"[sweep] left out {tag} at ratio {r:g}: the filtered set's {why}", flush=True)
    out_dir = Path(out_dir).resolve()
    store = storage.absolute(str(storage_dir)) if storage_dir else str(out_dir)
    dump_config(cfg, out_dir, "sweep_config.yaml")
    real = read_manifest(real_train_dir)
    name, fingerprint = experiment(cfg, real_train_dir, val_dir, dirs, name, asha, skip, test_dir)

    init_ray(cfg.ray)
    use_gpu = cfg.classify.use_gpu and cfg.classify.num_workers == 1
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial, cfg=cfg, real_dir=storage.absolute(str(real_train_dir)), val_dir=storage.absolute(str(val_dir)),
            synthetic_dirs=dirs, class_names=real["class_names"], in_chans=int(real["channels"]),
            train_dir=storage.join(store, f"{name}-train"), tracked=tracking.handle(),
            test_dir=storage.absolute(str(test_dir)) if test_dir else None,
        ),
        {"cpu": cfg.classify.cpus_per_worker if cfg.classify.num_workers == 1 else 1, "gpu": 1 if use_gpu else 0},
    )
    results = _tuner(cfg, trainable, store, name, fingerprint, asha).fit()

    # Collect one row per trial; fail, naming the cells, if some errored (a re-run resumes them).
    errors = [f"{(r.config or {}).get('cell')} seed {(r.config or {}).get('seed')}: {r.error}" for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} sweep trial(s) failed (run again to resume them):\n" + "\n".join(errors))
    unfinished = [f"{(r.config or {}).get('cell')} seed {(r.config or {}).get('seed')}" for r in results if "top1" not in (r.metrics or {})]
    if unfinished:  # e.g. the sweep was interrupted
        raise RuntimeError(f"{len(unfinished)} sweep trial(s) did not report (run again to resume them): {unfinished}")
    df = results_table([(r.config, r.metrics, r.metrics.get("trial_id", "")) for r in results], settings(cfg))
    df.attrs["skipped"] = [{"setting": tag, "ratio": r, "why": why} for (tag, r), why in skip.items()]
    write_outputs(df, out_dir)
    return df


# ----------------------------------------------------------------------------- outputs


def results_table(trials: list[tuple[dict, dict, str]], grid_settings) -> pd.DataFrame:
    """Rows (setting, ratio, seed, ...); real-only trials are repeated for every setting.

    ``grid_settings``: the ``(guidance, strength, tau)`` settings (or plain guidance values).
    ``strength`` is NaN for text-to-image; ``setting`` is :func:`setting_label`.
    """
    norm = [tuple(x) if isinstance(x, (tuple, list)) else (float(x), None, 0.0) for x in grid_settings]
    rows = []
    for config, metrics, trial_id in trials:
        cell, seed = config["cell"], int(config["seed"])
        base = {
            "ratio": float(cell["ratio"]), "seed": seed, "top1": float(metrics["top1"]), "top5": float(metrics["top5"]),
            "epochs": int(metrics["epochs"]), "seconds": float(metrics["seconds"]), "trial_id": trial_id,
            "test_top1": np.nan if metrics.get("test_top1") is None else float(metrics["test_top1"]),
        }
        shared = cell["guidance"] is None
        for g, st, t in (norm if shared else [(cell["guidance"], cell.get("strength"), cell.get("tau") or 0.0)]):
            rows.append({"guidance": float(g), "strength": np.nan if st is None else float(st), "tau": float(t),
                         "setting": setting_label(g, st, t), **base, "shared_real_only": shared})
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    order = {setting_label(*x): i for i, x in enumerate(norm)}  # config order of the settings
    return (df.assign(_o=df.setting.map(order)).sort_values(["_o", "ratio", "seed"], ignore_index=True)
            .drop(columns="_o"))


def _with_setting(df: pd.DataFrame) -> pd.DataFrame:
    """A table from before the strength / tau axes (guidance only) gets its setting column."""
    return df if "setting" in df else df.assign(setting=df.guidance.map(lambda g: setting_label(g)))


def _stopped_early(df: pd.DataFrame) -> int:
    """Trials that ran fewer epochs than the longest (ASHA stopped them); their top-1 is early."""
    if "epochs" not in df:
        return 0
    short = df[df.epochs < df.epochs.max()]
    return int(short.trial_id.nunique()) if "trial_id" in df else len(short)


def summarize(df: pd.DataFrame) -> dict:
    """Best synthetic cell (setting x ratio) by mean top-1 and its gain over real-only, paired by seed."""
    df = _with_setting(df)
    cells = df.groupby(["setting", "ratio"], sort=False)["top1"].agg(["mean", "std", "count"]).reset_index()
    real = df[df.ratio == 0].drop_duplicates("seed").set_index("seed")["top1"]
    syn = cells[cells.ratio > 0]
    out = {
        "best_guidance": None, "best_strength": None, "best_tau": None, "best_setting": None, "best_ratio": None,
        "best_top1_mean": None, "best_top1_std": None, "real_only_top1_mean": None, "gain_mean": None,
        "gain_std": None, "n_seeds": int(df.seed.nunique()), "verdict": "",
        "real_only_is_best": None, "stopped_early": _stopped_early(df),
    }
    if len(real):
        out["real_only_top1_mean"] = float(real.mean())
    if syn.empty:
        out["verdict"] = "no synthetic cells in the grid (only ratio 0); nothing to compare"
        return out
    best = syn.loc[syn["mean"].idxmax()]
    first = df[df.setting == best.setting].iloc[0]
    strength = first.get("strength", np.nan)
    out.update(best_guidance=float(first.guidance), best_strength=None if pd.isna(strength) else float(strength),
               best_tau=float(first.get("tau", 0.0)), best_setting=str(best.setting), best_ratio=float(best.ratio),
               best_top1_mean=float(best["mean"]), best_top1_std=None if pd.isna(best["std"]) else float(best["std"]))
    if real.empty:
        out["verdict"] = "no real-only baseline (ratio 0 is not in the grid); the gain cannot be computed"
        return out
    cell = (f"guidance {first.guidance:g}" if best.setting == setting_label(first.guidance) else str(best.setting)) \
        + f", ratio {best.ratio:g}"
    # Chosen on val (above); reported on test when the run has a test split, else on val.
    split, column = report_split(df)
    real = df[df.ratio == 0].drop_duplicates("seed").set_index("seed")[column]
    best_rows = df[(df.setting == best.setting) & (df.ratio == best.ratio)].set_index("seed")[column]
    g = paired(best_rows - real.reindex(best_rows.index))
    out.update(report_split=split, gain_mean=g["mean"], gain_std=None if np.isnan(g["std"]) else g["std"],
               gain_ci95=g["ci95"], real_only_is_best=bool(out["real_only_top1_mean"] > out["best_top1_mean"]),
               beyond_noise=excludes_zero(g))
    if split == "test":
        out.update(real_only_test_top1_mean=float(real.mean()), best_test_top1_mean=float(best_rows.mean()))
    out["verdict"] = f"best cell on val {cell}: on {split}, " + verdict(g)
    return out


def summary_markdown(df: pd.DataFrame, summary: dict) -> str:
    df = _with_setting(df)
    cells = df.groupby(["setting", "ratio"], sort=False)["top1"].agg(["mean", "std"]).reset_index()
    lines = [
        "# Sweep: synthetic-set setting (guidance w, image-to-image strength s, filter tau) x mixing ratio", "",
        f"**{summary['verdict']}**", "",
        "Gain = top-1 of the best synthetic cell minus real-only, paired by seed (mean and std "
        "of the per-seed differences); 'within noise' when |mean| <= std. The best cell is the "
        "maximum over the grid, so its gain is optimistic (winner's curse). Real-only (ratio 0) "
        "runs once per seed and is repeated in every setting's rows.", "",
    ]
    if summary.get("stopped_early"):
        lines += [f"{summary['stopped_early']} trial(s) were stopped early (ASHA); their top-1 is from fewer "
                  "epochs and is averaged in as is, so cell means mix training lengths.", ""]
    lines += ["| setting | ratio | top-1 mean | top-1 std |", "| --- | --- | --- | --- |"]
    for _, r in cells.iterrows():
        std = "" if pd.isna(r["std"]) else f"{r['std']:.2f}"
        lines.append(f"| {r.setting} | {r.ratio:g} | {r['mean']:.2f} | {std} |")
    if summary.get("skipped"):
        lines += ["", "Cells left out (a filtered set kept too few images of a class for the ratio):", ""]
        lines += [f"- {c['setting']} at ratio {c['ratio']:g}: the filtered set's {c['why']}" for c in summary["skipped"]]
    return "\n".join(lines) + "\n"


def plot_heatmap(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _with_setting(df)
    order = list(dict.fromkeys(df.setting))
    grid = df.pivot_table(index="setting", columns="ratio", values="top1", aggfunc="mean").reindex(order)  # (S, R)
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 3.5, 0.8 * grid.shape[0] + 2))
    im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{r:g}" for r in grid.columns])
    ax.set_yticks(range(grid.shape[0]), list(grid.index))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid.values[i, j]:.1f}", ha="center", va="center", color="w")
    ax.set_xlabel("synthetic:real ratio")
    ax.set_ylabel("synthetic set")
    ax.set_title("mean top-1 (%) on real val")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_ratio(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _with_setting(df)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, part in df.groupby("setting", sort=False):
        s = part.groupby("ratio")["top1"].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(s.index, s["mean"], yerr=s["std"], marker="o", capsize=3, label=label)
    ax.set_xlabel("synthetic:real ratio")
    ax.set_ylabel("top-1 (%) on real val")
    ax.set_title("accuracy vs ratio (mean +- std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(df: pd.DataFrame, out_dir: Path) -> dict:
    """Table, plots and summary into ``out_dir``; sets ``df.attrs["summary"]``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**summarize(df), "skipped": list(df.attrs.get("skipped", []))}
    df.attrs["summary"] = summary
    atomic_write_text(out_dir / "sweep.csv", df.to_csv(index=False))
    tmp = out_dir / ".sweep.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / "sweep.parquet")
    plot_heatmap(df, out_dir / "heatmap.png")
    plot_accuracy_vs_ratio(df, out_dir / "accuracy_vs_ratio.png")
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", summary_markdown(df, summary))
    return summary
