"""``synthaug study``: every arm of a recipe over k labelled images per class x subset draws x seeds.

Each (k, draw) is a run of its own, named ``<name>-k<k>-d<draw>``, with
``ingest.k_per_class=k`` and ``ingest.seed=draw`` (which images are labelled, and the
train/val split). It goes through the stages of ``synthaug run``, so everything is keyed
and a re-run reuses what is done: ingest, pretraining (by default once per draw, on the
draw's whole train split with its labels unused, shared by every k: ``study.share_pretrain``),
fine-tuning on the k labelled images per class,
sampling and filtering each sweep setting once, the sweep's Tune grid (real only, and
real + synthetic per setting and ratio, for every classifier seed) and the pseudo-label
students, alone and with the synthetic set of the sample config's recipe (with
``pseudolabel.with_synthetic``). Generator evaluation (FID and the rest) is left out: the
study measures classification.

Statistics. For each k, an arm's top-1 minus real only's on the same (draw, seed) is a
paired difference (the same labelled images, val split and seed). Pooled over draws x
seeds: mean, sample standard deviation, n and a 95% Student-t confidence interval of the
mean. The issue's goal for an arm is a mean gain over real only above twice the standard
deviation of those differences, and a gain over the pseudo-label baseline that is positive
or whose interval holds zero (it matches).

Writes ``<results_dir>/<name>/``: ``study.csv`` (one row per k, draw, seed and arm),
``study.json`` (per k and arm: the figures above, the stage times of each run) and
``study.md`` (the tables), plus each run's sweep table under ``k<k>-d<draw>/sweep/``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from synthaug import storage, tracking
from synthaug.artifacts import atomic_write_json, atomic_write_text, is_complete, read_manifest
from synthaug.config import Config, dump_config, replace

REAL, PSEUDO = "real only", "pseudo-label"


def run_config(cfg: Config, k: int, draw: int) -> Config:
    """The config of one (k, draw) run."""
    return replace(cfg, name=f"{cfg.name}-k{k}-d{draw}", ingest=replace(cfg.ingest, k_per_class=int(k), seed=int(draw)))


def arm_label(setting: str, ratio: float, base: str = "real") -> str:
    """``real + syn (w=1 s=0.3)``, with the ratio when it is not 1:1."""
    r = "" if math.isclose(ratio, 1.0) else f" {ratio:g}:1"
    return f"{base} + syn{r} ({setting})"


def pretrain_dir(cfg: Config, draw: int) -> str:
    """Where the study's shared pretrained generator of ``draw`` is exported (``study.share_pretrain``)."""
    return storage.join(cfg.work_dir, f"{cfg.name}-d{draw}", "generators", "pretrain")


def _fit_batch(cfg: Config, rows: int) -> Config:
    """Fine-tuning's batch capped at the labelled rows per worker (k=5 x 10 classes is 50 < 64): a
    smaller k cannot fill the default batch; any k that can keeps the recipe unchanged."""
    t = cfg.finetune
    if rows >= t.batch_size * t.num_workers:
        return cfg
    return replace(cfg, finetune=replace(t, batch_size=max(1, rows // t.num_workers)))


def run_one(cfg: Config, out_dir: str, pretrained: str | None = None) -> tuple[list[dict], dict, list[str]]:
    """One (k, draw) run: its rows ``{arm, seed, top1}``, its stage times (s) and the settings it skipped.

    ``pretrained``: pretrain there on the run's whole train split (``train_full``) and
    fine-tune from it; None: pretrain on the run's unlabelled pool, as ``synthaug run``.
    """
    from synthaug import pipeline as P
    from synthaug.report import headline_ratio
    from synthaug.sweep import primary_strength, run_sweep, setting_label, settings

    p = P.RunPaths(cfg)
    timer = P.Timer()
    timer("ingest", P.stage_ingest, cfg)
    cfg = _fit_batch(cfg, int(read_manifest(p.data("train"))["num_rows"]))
    if pretrained:
        timer("pretrain", P.stage_pretrain, cfg, p.train_full(), pretrained)
    elif is_complete(p.data("pool")):
        timer("pretrain", P.stage_pretrain, cfg)
    timer("finetune", P.stage_finetune, cfg, base=pretrained)
    _, mix_sets, _, teacher = P.synthetic_sets(cfg, timer, headline=cfg.pseudolabel.with_synthetic)
    # A filtered set can keep too few images of a class for the largest ratio (a weak teacher at
    # small k is rarely confident): its arms are left out of this run and reported as skipped.
    max_ratio = max(float(r) for r in cfg.sweep.ratios)
    short = {key: why for key, path in mix_sets.items() if (why := shortfall(p.data("train"), path, max_ratio))}
    skipped = [f"{setting_label(*key)}: {why}" for key, why in sorted(short.items(), key=lambda x: x[0][2])]
    taus = [t for t in (cfg.sweep.taus or (cfg.filter.tau,)) if not any(k[2] == float(t) for k in short)]
    if not taus:
        raise ValueError(f"{cfg.name}: no synthetic set can be mixed: {skipped}")
    cfg = replace(cfg, sweep=replace(cfg.sweep, taus=tuple(taus)))
    grid = set(settings(cfg))
    df = timer("sweep", run_sweep, cfg, p.data("train"), p.data("val"), {k: v for k, v in mix_sets.items() if k in grid},
               storage.join(out_dir, "sweep"), name=cfg.sweep.name, storage_dir=p.ray)
    rows = [{"arm": REAL, "seed": int(r.seed), "top1": float(r.top1)}
            for r in df[df.ratio == 0].drop_duplicates("seed").itertuples()]
    rows += [{"arm": arm_label(r.setting, float(r.ratio)), "seed": int(r.seed), "top1": float(r.top1)}
             for r in df[df.ratio > 0].itertuples()]
    if cfg.pseudolabel.enabled and is_complete(p.data("pool")):
        teacher = teacher or timer("teacher", P.stage_teacher, cfg)
        key = (float(cfg.sample.guidance_scale), primary_strength(cfg), float(cfg.filter.tau))
        ratio = headline_ratio(cfg.sweep.ratios)
        combo = mix_sets[key] if cfg.pseudolabel.with_synthetic and ratio > 0 and key not in short else None
        pseudo = timer("pseudolabel", P.stage_pseudolabel, cfg, teacher=teacher, synthetic=combo, ratio=ratio)
        rows += [{"arm": PSEUDO, "seed": int(r["seed"]), "top1": float(r["top1"])} for r in pseudo["students"]]
        rows += [{"arm": arm_label(setting_label(*key), ratio, base=PSEUDO), "seed": int(r["seed"]), "top1": float(r["top1"])}
                 for r in pseudo.get("combined", [])]
    return rows, timer.seconds, skipped


def shortfall(real_train: str, synthetic: str, ratio: float) -> str | None:
    """Why ``synthetic`` cannot give ``ratio`` x the real count of every class, or None when it can."""
    from synthaug.sweep import shortfall as first_short

    short = first_short(read_manifest(real_train), read_manifest(synthetic), ratio)
    return None if short is None else f"class {short[0]!r} kept {short[1]} images, ratio {ratio:g} needs {short[2]}"


def paired(diffs) -> dict:
    """Mean, sample std, n and the 95% t interval of paired differences."""
    from scipy import stats

    d = np.asarray(list(diffs), dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "std": sd, "n": n, "ci95": [mean - half, mean + half]}


def summarize(table: pd.DataFrame) -> dict:
    """Per k and arm: top-1 over draws x seeds, and paired differences against real only and the pseudo-label arm.

    ``table``: columns ``k, draw, seed, arm, top1``. An arm's pairs are the (draw, seed)
    that both it and the reference ran.
    """
    out: dict = {}
    for k, tk in table.groupby("k", sort=True):
        wide = tk.pivot_table(index=["draw", "seed"], columns="arm", values="top1", aggfunc="first")
        arms = {}
        for arm in [a for a in _arm_order(wide.columns)]:
            col = wide[arm].dropna()
            row = {"top1_mean": float(col.mean()), "top1_std": float(col.std(ddof=1)) if len(col) > 1 else float("nan"),
                   "n": int(len(col)), "draws": sorted(int(d) for d in col.index.get_level_values("draw").unique())}
            for ref, tag in ((REAL, "vs_real"), (PSEUDO, "vs_pseudo")):
                if arm != ref and ref in wide:
                    pair = (wide[arm] - wide[ref]).dropna()
                    row[tag] = paired(pair)
            g = row.get("vs_real")
            if g and g["n"] > 1:
                row["beats_real_2sd"] = bool(g["mean"] > 2 * g["std"])
            v = row.get("vs_pseudo")
            if v and v["n"] > 1:
                row["beats_or_matches_pseudo"] = bool(v["mean"] >= 0 or v["ci95"][1] >= 0)
            arms[arm] = row
        out[int(k)] = arms
    return out


def _arm_order(arms) -> list[str]:
    """Real only, pseudo-label, the real + synthetic arms, then the pseudo-label + synthetic arms."""
    arms = list(arms)
    rank = lambda a: (0 if a == REAL else 1 if a == PSEUDO else 3 if a.startswith(PSEUDO) else 2, a)  # noqa: E731
    return sorted(arms, key=rank)


def goal_met(summary: dict) -> list[tuple[int, str]]:
    """The (k, arm) with synthetic images that meet the issue's goal (beats real only by > 2 sd, and matches pseudo-label)."""
    return [(k, arm) for k, arms in summary.items() for arm, r in arms.items()
            if "syn" in arm and r.get("beats_real_2sd") and r.get("beats_or_matches_pseudo", True)]


def _f(x, d: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _gain(g: dict | None) -> str:
    if not g:
        return ""
    lo, hi = g["ci95"]
    return f"{g['mean']:+.2f} ± {_f(g['std'])} [{_f(lo)}, {_f(hi)}]"


def markdown(summary: dict, cfg: Config, seconds: dict, command: str, skipped: dict | None = None) -> str:
    """The study's tables: per k, each arm's top-1 and its paired gains with 95% intervals."""
    from synthaug.classify.pseudolabel import describe_selection

    s = cfg.study
    lines = [f"# synthaug study `{cfg.name}`", "",
             f"Data `{cfg.ingest.source}`; classifier `{cfg.classify.model}`, {cfg.classify.epochs} epochs of |labelled| "
             f"images per run; seeds {list(cfg.classify.seeds)} x subset draws (`ingest.seed`) {list(s.draws)}, "
             f"for k in {list(s.k_per_class)} labelled images per class.", "",
             f"Pseudo-labels: a teacher (real only, seed {cfg.pseudolabel.teacher_seed}) labels the unlabelled pool; "
             f"kept: {describe_selection(cfg)}.", "",
             f"Command: `{command}`", "",
             "Gains are paired differences in top-1 points (same draw, same seed), pooled over draws x seeds: "
             "mean ± std [95% t interval of the mean]. *Goal* (issue 12): a gain over real only above 2 std, "
             "and a gain over pseudo-label that is positive or holds 0 in its interval.", ""]
    met = goal_met(summary)
    if met:
        lines += ["**Goal met by:** " + "; ".join(f"k={k}: {a}" for k, a in met), ""]
    else:
        lines += ["**Goal not met:** no arm with synthetic images beats real only by more than 2 std of the paired "
                  "differences while matching pseudo-label, at any k.", ""]
    for k, arms in summary.items():
        lines += [f"## k = {k} labelled images per class", "",
                  "| arm | top-1 (mean ± std) | n | gain vs real only | gain vs pseudo-label | > 2 sd over real |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for arm, r in arms.items():
            beats = {True: "yes", False: "no"}.get(r.get("beats_real_2sd"), "")
            lines.append(f"| {arm} | {r['top1_mean']:.2f} ± {_f(r['top1_std'])} | {r['n']} | {_gain(r.get('vs_real'))} | "
                         f"{_gain(r.get('vs_pseudo'))} | {beats} |")
        lines.append("")
    if skipped:
        lines += ["## Arms left out", "", "A filtered set that keeps fewer images of a class than the mixture needs "
                  "cannot be mixed; its arms are missing from these runs:", ""]
        lines += [f"- `{run}`: {why}" for run, whys in skipped.items() for why in whys] + [""]
    total = sum(sum(v.values()) for v in seconds.values())
    lines += ["## Wall time of this invocation", "", f"{total / 60:.1f} min over {len(seconds)} runs "
              f"({', '.join(f'{r}: {sum(v.values()) / 60:.1f}' for r, v in seconds.items())}). Stages that an earlier "
              "invocation finished are reused by their keys and count ~0 here (as in `study.json`).", ""]
    return "\n".join(lines)


def run_study(cfg: Config, command: str = "synthaug study") -> dict:
    """The study (:func:`_run_study`) as one tracked parent run: a child per (k, draw) run, a grandchild per stage."""
    with tracking.run(cfg, "study"):
        flat = _run_study(cfg, command)
        tracking.final(flat)
        return flat


def _run_study(cfg: Config, command: str) -> dict:
    """Every (k, draw) run, then the tables; returns the headline k's summary, flat."""
    out = storage.join(cfg.results_dir, cfg.name)
    if storage.local_path(out) is None:
        raise ValueError(f"results_dir: the study draws its sweep plots locally; {cfg.results_dir} is not a local path")
    dump_config(cfg, out, "config.attempt.yaml")
    rows, seconds, skipped = [], {}, {}
    for k in cfg.study.k_per_class:
        for draw in cfg.study.draws:
            rc = run_config(cfg, k, draw)
            print(f"\n##### study {cfg.name}: k={k} draw={draw} (run {rc.name}) #####", flush=True)
            shared = pretrain_dir(cfg, draw) if cfg.study.share_pretrain else None
            with tracking.stage(rc.name, rc):
                got, secs, skip = run_one(rc, storage.join(out, f"k{k}-d{draw}"), shared)
            rows += [{"k": int(k), "draw": int(draw), **r} for r in got]
            seconds[rc.name] = secs
            if skip:
                skipped[rc.name] = skip
    table = pd.DataFrame(rows, columns=["k", "draw", "seed", "arm", "top1"])
    summary = summarize(table)
    atomic_write_text(storage.join(out, "study.csv"), table.to_csv(index=False))
    atomic_write_json(storage.join(out, "study.json"), {
        "command": command, "k_per_class": list(cfg.study.k_per_class), "draws": list(cfg.study.draws),
        "seeds": [int(s) for s in cfg.classify.seeds], "summary": {str(k): v for k, v in summary.items()},
        "goal_met": [list(x) for x in goal_met(summary)], "stage_seconds": seconds, "skipped": skipped})
    atomic_write_text(storage.join(out, "study.md"), markdown(summary, cfg, seconds, command, skipped))
    dump_config(cfg, out)
    storage.delete(storage.join(out, "config.attempt.yaml"))
    tracking.artifacts(out)  # study.md / .json / .csv, each run's sweep table and plots
    head = summary[int(cfg.study.headline_k)]
    flat = {"study": str(out), "runs": len(seconds), "goal_met": len(goal_met(summary))}
    for arm, r in head.items():
        flat[f"{arm}: top1"] = round(r["top1_mean"], 2)
        if "vs_real" in r:
            flat[f"{arm}: gain vs real"] = round(r["vs_real"]["mean"], 2)
    return flat
