"""``synthaug study``: every arm of a recipe over k labelled images per class x subset draws x seeds.

Each (k, draw) is a run of its own, named ``<name>-k<k>-d<draw>``, with
``ingest.k_per_class=k`` and ``ingest.seed=draw`` (which images are labelled, and the
train/val split). It goes through the stages of ``synthaug run``, so everything is keyed
and a re-run reuses what is done: ingest, pretraining (by default once per draw, on the
draw's whole train split with its labels unused, shared by every k: ``study.share_pretrain``; or once
for the whole study, on the first draw's: ``study.pretrain_once``),
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
``study.md`` (the tables), plus each run's sweep table under ``k<k>-d<draw>/sweep/`` and its
``run.json`` (key, rows, stage seconds), from which a later invocation reuses the finished run.
"""

from __future__ import annotations

import math

import pandas as pd

from synthaug import storage, tracking
from synthaug.artifacts import atomic_write_json, atomic_write_text, is_complete, read_manifest
from synthaug.stats import mean_std, paired, report_split
from synthaug.config import Config, dump_config, replace

REAL, PSEUDO, DPT = "real only", "pseudo-label", "syn-DPT"


def run_config(cfg: Config, k: int, draw: int) -> Config:
    """The config of one (k, draw) run: ``study.k_overrides`` of its k, its name, k and draw."""
    from synthaug.config import load_config

    over = cfg.study.k_overrides.get(int(k))  # each k's overrides were checked when cfg was built (config.validate)
    base = load_config(None, over, base=cfg) if over else cfg
    return replace(base, name=f"{cfg.name}-k{k}-d{draw}", ingest=replace(base.ingest, k_per_class=int(k), seed=int(draw)))


def arm_label(setting: str, ratio: float, base: str = "real", recipe: str = "", syn: str = "syn") -> str:
    """``real + syn (w=1 s=0.3)``, with the ratio when it is not 1:1 and the recipe when not the plain one."""
    r = "" if math.isclose(ratio, 1.0) else f" {ratio:g}:1"
    return f"{base} + {syn}{r} ({setting})" + (f" [{recipe}]" if recipe else "")


def pretrain_dir(cfg: Config, draw: int) -> str:
    """Where the study's shared pretrained generator of ``draw`` is exported (``study.share_pretrain``)."""
    return storage.join(cfg.work_dir, f"{cfg.name}-d{draw}", "generators", "pretrain")


def pretraining(cfg: Config, draw: int) -> tuple[str | None, bool]:
    """Draw ``draw``'s shared pretrained generator (None: its run pretrains on its pool) and whether it trains it."""
    if not cfg.study.share_pretrain:
        return None, True
    first = cfg.study.draws[0] if cfg.study.pretrain_once else draw
    return pretrain_dir(cfg, first), draw == first


def _fit_batch(cfg: Config, rows: int) -> Config:
    """Fine-tuning's batch capped at the labelled rows per worker (k=5 x 10 classes is 50 < 64): a
    smaller k cannot fill the default batch; any k that can keeps the recipe unchanged."""
    t = cfg.finetune
    if rows >= t.batch_size * t.num_workers:
        return cfg
    return replace(cfg, finetune=replace(t, batch_size=max(1, rows // t.num_workers)))


def run_one(cfg: Config, out_dir: str, pretrained: str | None = None,
            pretrain: bool = True) -> tuple[list[dict], dict, list[str]]:
    """One (k, draw) run: its rows ``{arm, seed, top1}``, its stage times (s) and the settings it skipped.

    ``pretrained``: pretrain there on the run's whole train split (``train_full``) and
    fine-tune from it (``pretrain=False``: only fine-tune from it, another run pretrained it);
    None: pretrain on the run's unlabelled pool, as ``synthaug run``.
    """
    from synthaug import pipeline as P
    from synthaug.report import headline_ratio
    from synthaug.sweep import primary_strength, run_sweep, setting_label, settings

    p = P.RunPaths(cfg)
    timer = P.Timer()
    timer("ingest", P.stage_ingest, cfg)
    cfg = _fit_batch(cfg, int(read_manifest(p.data("train"))["num_rows"]))
    if pretrained and not pretrain:
        if not is_complete(pretrained):
            raise ValueError(f"{cfg.name}: the study's shared pretraining {pretrained} is not complete")
    elif pretrained:
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
    sets = {k: v for k, v in mix_sets.items() if k in grid}
    with_pool = cfg.pseudolabel.enabled and is_complete(p.data("pool"))
    if with_pool or cfg.study.recipes:
        teacher = teacher or timer("teacher", P.stage_teacher, cfg)
    dpt = _dpt_sets(cfg, timer, teacher, pretrained, sets) if cfg.study.dpt and with_pool else {}
    dpt_short = {key: why for key, path in dpt.items() if (why := shortfall(p.data("train"), path, max_ratio))}
    skipped += [f"DPT {setting_label(*key)}: {why}" for key, why in dpt_short.items()]
    dpt = {k: v for k, v in dpt.items() if k not in dpt_short}
    rows = []
    for budget in budgets(cfg):
        for recipe, ccfg in recipe_configs(cfg, budget, teacher):
            tag = f"-{recipe}" if recipe else ""
            rc = replace(cfg, classify=ccfg)
            if recipe:  # real only does not change with a recipe for added data: it runs once per budget
                rc = replace(rc, sweep=replace(rc.sweep, ratios=tuple(r for r in rc.sweep.ratios if float(r) > 0)))
            df = timer(f"sweep b={budget}{tag}", run_sweep, rc, p.data("train"), p.data("val"), sets,
                       storage.join(out_dir, f"sweep-b{budget}{tag}"), name=f"{cfg.sweep.name}{tag}",
                       storage_dir=p.ray, test_dir=p.test())
            base = {"budget": int(budget), "recipe": recipe}
            rows += [{"arm": REAL, "seed": int(r.seed), "top1": float(r.top1), "test_top1": _num(r, "test_top1"), **base}
                     for r in df[df.ratio == 0].drop_duplicates("seed").itertuples()]
            rows += [{"arm": arm_label(r.setting, float(r.ratio), recipe=recipe), "seed": int(r.seed),
                      "top1": float(r.top1), "test_top1": _num(r, "test_top1"), **base}
                     for r in df[df.ratio > 0].itertuples()]
            if dpt:
                dc = replace(rc, sweep=replace(rc.sweep, ratios=tuple(r for r in rc.sweep.ratios if float(r) > 0),
                                               taus=tuple(sorted({k[2] for k in dpt}))))
                df = timer(f"sweep b={budget}{tag} dpt", run_sweep, dc, p.data("train"), p.data("val"), dpt,
                           storage.join(out_dir, f"sweep-b{budget}{tag}-dpt"), name=f"{cfg.sweep.name}{tag}-dpt",
                           storage_dir=p.ray, test_dir=p.test())
                rows += [{"arm": arm_label(r.setting, float(r.ratio), recipe=recipe, syn=DPT), "seed": int(r.seed),
                          "top1": float(r.top1), "test_top1": _num(r, "test_top1"), **base}
                         for r in df[df.ratio > 0].itertuples()]
            if with_pool:
                key = (float(cfg.sample.guidance_scale), primary_strength(cfg), float(cfg.filter.tau))
                ratio = headline_ratio(cfg.sweep.ratios)
                combo = mix_sets[key] if cfg.pseudolabel.with_synthetic and ratio > 0 and key not in short else None
                pseudo = timer(f"pseudolabel b={budget}{tag}", P.stage_pseudolabel, rc, teacher=teacher, synthetic=combo,
                               ratio=ratio)
                rows += [{"arm": PSEUDO + (f" [{recipe}]" if recipe else ""), "seed": int(r["seed"]), "top1": float(r["top1"]),
                          "test_top1": _num(r, "test_top1"), **base} for r in pseudo["students"]]
                rows += [{"arm": arm_label(setting_label(*key), ratio, base=PSEUDO, recipe=recipe), "seed": int(r["seed"]),
                          "top1": float(r["top1"]), "test_top1": _num(r, "test_top1"), **base}
                         for r in pseudo.get("combined", [])]
    return rows, timer.seconds, skipped


RUN_RECORD = "run.json"  # beside a (k, draw) run's sweep tables: its key, rows, skipped arms and stage seconds


def run_key(cfg: Config, inputs: dict) -> str:
    """The key of one (k, draw) run's rows: every result-changing field of the sections it runs
    (``identity.config_fields``), the study's recipe keys, which draw pretrains the shared
    generator, and ``inputs`` (the content hashes of its ingested splits, which stand for the
    source's location). Paths, Ray, tracking, evaluation and the study's lists of k and draws are
    not in it."""
    from synthaug import identity
    from synthaug.config import _RUN_SECTIONS, to_dict

    # A run's sections (those study.k_overrides may change), but evaluation: the study measures classification.
    fields = {name: identity.config_fields(name, getattr(cfg, name)) for name in _RUN_SECTIONS - {"evaluate"}}
    for where in ("path", "test_path"):  # the source's location (made absolute by the CLI): its content is in `inputs`
        fields["ingest"].pop(where, None)
    study = {k: v for k, v in to_dict(cfg.study).items() if k not in ("k_per_class", "draws", "headline_k", "k_overrides")}
    first = cfg.study.draws[0] if cfg.study.share_pretrain and cfg.study.pretrain_once else None
    return identity.artifact_key("study-run", fields, inputs, study=study, pretrained_on_draw=first)


def _run_inputs(cfg: Config) -> dict:
    """The content hashes of a run's ingested splits (ingesting them first: keyed, so usually reused)."""
    from synthaug import identity
    from synthaug import pipeline as P

    P.stage_ingest(cfg)
    p = P.RunPaths(cfg)
    return {s: identity.dataset_hash(p.data(s)) for s in ("train", "val", "pool", "train_full", "test")
            if is_complete(p.data(s))}


def finished_run(run_dir: str, key: str) -> tuple[list[dict], dict, list[str]] | None:
    """The rows, stage seconds and skipped arms of a (k, draw) run that finished with ``key``
    (:data:`RUN_RECORD` in its results directory, written last), or None: a committed study grows by
    a k or a draw without running the finished ones again, on any machine."""
    from synthaug import identity

    rec = identity.keyed_record(run_dir, key, RUN_RECORD)
    if rec is None:
        return None
    print(f"[study] {run_dir}: reusing the finished run's rows (same key {key[:12]})", flush=True)
    return rec["rows"], rec.get("seconds", {}), rec.get("skipped", [])


def _record_run(cfg: Config, run_dir: str, key: str, result: tuple[list[dict], dict, list[str]]):
    """Write a finished run's :data:`RUN_RECORD` (its key, rows, seconds and skipped arms); returns ``result``."""
    rows, seconds, skipped = result
    atomic_write_json(storage.join(run_dir, RUN_RECORD), {"key": key, "run": cfg.name,
                                                          "rows": rows, "seconds": seconds, "skipped": skipped})
    return result


def _dpt_sets(cfg: Config, timer, teacher: dict, base: str | None, sets: dict) -> dict:
    """``study.dpt``: the sample config's set again, from the DPT generator (fine-tuned on labelled +
    pseudo-labelled rows, :func:`synthaug.pipeline.stage_dpt`), filtered at each mixed setting's tau
    (or at ``study.dpt_tau`` alone): ``(guidance, strength, tau) -> set``."""
    from synthaug import pipeline as P

    from synthaug.sweep import primary_strength

    sampled = timer("dpt", P.stage_dpt, cfg, teacher, base)
    recipe = (float(cfg.sample.guidance_scale), primary_strength(cfg))
    taus = [float(cfg.study.dpt_tau)] if cfg.study.dpt_tau is not None else sorted({k[2] for k in sets if k[:2] == recipe})
    out = {}
    for tau in taus:  # one sampled set at the sample config's recipe, filtered per tau
        key = (*recipe, tau)
        out[key] = sampled if tau <= 0 else timer(f"filter dpt tau={tau:g}", P.stage_filter,
                                                  replace(cfg, filter=replace(cfg.filter, tau=tau)), sampled, teacher)[0]
    return out


def _num(row, key: str) -> float:
    v = row.get(key) if isinstance(row, dict) else getattr(row, key, None)
    return float("nan") if v is None else float(v)


def budgets(cfg: Config) -> list[int]:
    """The study's training budgets (``classify.epoch_images`` values); the config's own when none are listed."""
    return [int(b) for b in cfg.study.budgets] or [int(cfg.classify.epoch_images)]


def recipe_configs(cfg: Config, budget: int, teacher: dict | None) -> list[tuple[str, object]]:
    """``(name, classify config)`` of the plain recipe ('') and each ``study.recipes`` entry at ``budget``.

    ``kd_teacher: teacher`` stands for the run's real-only teacher (its exported model);
    ``teacher=None`` only checks the configs (before any work)."""
    out = [("", replace(cfg.classify, epoch_images=int(budget)))]
    for name, over in cfg.study.recipes.items():
        over = dict(over)
        if over.get("kd_teacher") == "teacher":
            over["kd_teacher"] = str(teacher["model"]) if teacher else "(the run's teacher)"
        out.append((str(name), replace(cfg.classify, epoch_images=int(budget), **over)))
    return out


def shortfall(real_train: str, synthetic: str, ratio: float) -> str | None:
    """Why ``synthetic`` cannot give ``ratio`` x the real count of every class, or None when it can."""
    from synthaug.sweep import shortfall as first_short

    short = first_short(read_manifest(real_train), read_manifest(synthetic), ratio)
    return None if short is None else f"class {short[0]!r} kept {short[1]} images, ratio {ratio:g} needs {short[2]}"


def best_budgets(tk: pd.DataFrame) -> dict[str, int]:
    """Each arm's budget with the best mean val top-1 (the selection split)."""
    if "budget" not in tk:
        return {}
    means = tk.groupby(["arm", "budget"])["top1"].mean().reset_index()
    return {arm: int(g.loc[g["top1"].idxmax(), "budget"]) for arm, g in means.groupby("arm")}


def summarize(table: pd.DataFrame, by_budget: bool = False) -> dict:
    """Per k and arm: top-1 over draws x seeds, and paired differences against real only and the pseudo-label arm.

    ``table``: columns ``k, draw, seed, arm, top1`` (val) and optionally ``test_top1`` and
    ``budget``. Each arm is taken at its best budget on val (:func:`best_budgets`) and
    reported on test when there is one (``stats.report_split``); ``by_budget`` gives
    ``{k: {budget: arms}}``, every arm at the same budget, instead. An arm's pairs are the
    (draw, seed) that both it and the reference ran.
    """
    split, column = report_split(table)
    out: dict = {}
    for k, tk in table.groupby("k", sort=True):
        if by_budget:
            out[int(k)] = {int(b): _arms(tb, column) for b, tb in tk.groupby("budget", sort=True)}
            continue
        best = best_budgets(tk)
        if best:
            tk = tk[[best[a] == b for a, b in zip(tk["arm"], tk["budget"])]]
        arms = _arms(tk, column)
        for arm, row in arms.items():
            row.update({"budget": best.get(arm), "split": split,
                        "val_top1_mean": float(tk[tk.arm == arm]["top1"].mean())})
        out[int(k)] = arms
    return out


def _arms(tk: pd.DataFrame, column: str) -> dict:
    """Each arm's figures on ``column`` and its paired gains (one row per draw, seed and arm in ``tk``)."""
    wide = tk.pivot_table(index=["draw", "seed"], columns="arm", values=column, aggfunc="first")
    arms = {}
    for arm in _arm_order(wide.columns):
        col = wide[arm].dropna()
        m, sd = mean_std(col)
        row = {"top1_mean": m, "top1_std": sd,
               "n": int(len(col)), "draws": sorted(int(d) for d in col.index.get_level_values("draw").unique())}
        for ref, tag in ((REAL, "vs_real"), (PSEUDO, "vs_pseudo")):
            if arm != ref and ref in wide:
                row[tag] = paired((wide[arm] - wide[ref]).dropna())
        g = row.get("vs_real")
        if g and g["n"] > 1:
            row["beats_real_2sd"] = bool(g["mean"] > 2 * g["std"] and g["ci95"][0] > 0)
        v = row.get("vs_pseudo")
        if v and v["n"] > 1:
            row["beats_or_matches_pseudo"] = bool(v["ci95"][1] >= 0)
        arms[arm] = row
    return arms


def _arm_order(arms) -> list[str]:
    """Real only, pseudo-label, the real + synthetic arms, then the pseudo-label + synthetic arms."""
    arms = list(arms)
    rank = lambda a: (0 if a == REAL else 1 if a == PSEUDO else 3 if a.startswith(PSEUDO + " +") else  # noqa: E731
                      1 if a.startswith(PSEUDO) else 2, a)
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


def markdown(summary: dict, cfg: Config, seconds: dict, command: str, skipped: dict | None = None,
             per_budget: dict | None = None) -> str:
    """The study's tables: per k, each arm's top-1 and its paired gains with 95% intervals."""
    from synthaug.classify.pseudolabel import describe_selection

    s = cfg.study
    lines = [f"# synthaug study `{cfg.name}`", "",
             f"Data `{cfg.ingest.source}`; classifier `{cfg.classify.model}`, {cfg.classify.epochs} epochs of "
             f"{_epoch(cfg)} images per run; seeds {list(cfg.classify.seeds)} x subset draws (`ingest.seed`) {list(s.draws)}, "
             f"for k in {list(s.k_per_class)} labelled images per class.", "",
             f"Pseudo-labels: a teacher (real only, seed {cfg.pseudolabel.teacher_seed}) labels the unlabelled pool; "
             f"kept: {describe_selection(cfg)}.", "",
             *([f"Per-k overrides: {'; '.join(f'k={k}: {o}' for k, o in s.k_overrides.items())}.", ""] if s.k_overrides else []),
             f"Command: `{command}`", "",
             "Gains are paired differences in top-1 points (same draw, same seed), pooled over draws x seeds: "
             "mean ± std [95% t interval of the mean]. *Goal*: a gain over real only above 2 std whose interval is "
             "above 0, and a gain over pseudo-label whose interval is above 0 or holds it.", "",
             _selection_line(summary, cfg), ""]
    met = goal_met(summary)
    if met:
        lines += ["**Goal met by:** " + "; ".join(f"k={k}: {a}" for k, a in met), ""]
    else:
        lines += ["**Goal not met:** no arm with synthetic images beats real only by more than 2 std of the paired "
                  "differences while matching pseudo-label, at any k.", ""]
    for k, arms in summary.items():
        lines += [f"## k = {k} labelled images per class", ""] + _arm_table(arms, with_budget=bool(cfg.study.budgets))
        for b, at_b in (per_budget or {}).get(k, {}).items():
            lines += [f"### k = {k}, every arm at budget {b} images per epoch", ""] + _arm_table(at_b)
    lines += [f"Recipes for the arms with added data ({', '.join(f'`{n}`: {o}' for n, o in cfg.study.recipes.items())}) "
              "are arms of their own, named in brackets.", ""] if cfg.study.recipes else []
    if skipped:
        lines += ["## Arms left out", "", "A filtered set that keeps fewer images of a class than the mixture needs "
                  "cannot be mixed; its arms are missing from these runs:", ""]
        lines += [f"- `{run}`: {why}" for run, whys in skipped.items() for why in whys] + [""]
    total = sum(sum(v.values()) for v in seconds.values())
    lines += ["## Wall time of the runs", "", f"{total / 60:.1f} min over {len(seconds)} runs "
              f"({', '.join(f'{r}: {sum(v.values()) / 60:.1f}' for r, v in seconds.items())}). A run reused from its "
              f"`{RUN_RECORD}` counts the seconds recorded when it ran; inside a run, a stage that an earlier "
              "invocation finished is reused by its key and counts ~0 (as in `study.json`).", ""]
    return "\n".join(lines)


def _epoch(cfg: Config) -> str:
    """What an epoch is: the study's budgets, ``classify.epoch_images``, or the labelled rows."""
    if cfg.study.budgets:
        return " or ".join(f"{b:,}" for b in cfg.study.budgets)
    return f"{cfg.classify.epoch_images:,}" if cfg.classify.epoch_images else "|labelled|"


def _selection_line(summary: dict, cfg: Config) -> str:
    split = next((r.get("split") for arms in summary.values() for r in arms.values()), "val")
    where = ("test, a split nothing was chosen on" if split == "test" else
             "val, the split they were chosen on (these runs have no test split: set ingest.test_fraction or test_path)")
    budgets_ = f"each arm at its best training budget on val (budgets {list(cfg.study.budgets)} images per epoch), " \
        if cfg.study.budgets else ""
    return f"Selection: {budgets_}figures reported on {where}."


def _arm_table(arms: dict, with_budget: bool = False) -> list[str]:
    head = "| arm | " + ("budget | " if with_budget else "") + "top-1 (mean ± std) | n | gain vs real only | " \
        "gain vs pseudo-label | goal over real |"
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for arm, r in arms.items():
        beats = {True: "yes", False: "no"}.get(r.get("beats_real_2sd"), "")
        budget = f"{r.get('budget')} | " if with_budget else ""
        lines.append(f"| {arm} | {budget}{r['top1_mean']:.2f} ± {_f(r['top1_std'])} | {r['n']} | {_gain(r.get('vs_real'))} | "
                     f"{_gain(r.get('vs_pseudo'))} | {beats} |")
    return lines + [""]


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
    for b in budgets(cfg):  # every recipe's classify config is checked before any work
        recipe_configs(cfg, b, None)
    for k in cfg.study.k_per_class:  # and every k's overrides
        run_config(cfg, k, cfg.study.draws[0])
    dump_config(cfg, out, "config.attempt.yaml")
    rows, seconds, skipped = [], {}, {}
    for k in cfg.study.k_per_class:
        for draw in cfg.study.draws:
            rc = run_config(cfg, k, draw)
            print(f"\n##### study {cfg.name}: k={k} draw={draw} (run {rc.name}) #####", flush=True)
            shared, pretrain = pretraining(cfg, draw)
            run_dir = storage.join(out, f"k{k}-d{draw}")
            with tracking.stage(rc.name, rc):
                key = run_key(rc, _run_inputs(rc))
                got, secs, skip = finished_run(run_dir, key) or _record_run(
                    rc, run_dir, key, run_one(rc, run_dir, shared, pretrain))
            rows += [{"k": int(k), "draw": int(draw), **r} for r in got]
            seconds[rc.name] = secs
            if skip:
                skipped[rc.name] = skip
    table = pd.DataFrame(rows, columns=["k", "draw", "seed", "arm", "recipe", "budget", "top1", "test_top1"])
    summary = summarize(table)
    per_budget = summarize(table, by_budget=True) if len(budgets(cfg)) > 1 else {}
    atomic_write_text(storage.join(out, "study.csv"), table.to_csv(index=False))
    atomic_write_json(storage.join(out, "study.json"), {
        "command": command, "k_per_class": list(cfg.study.k_per_class), "draws": list(cfg.study.draws),
        "seeds": [int(s) for s in cfg.classify.seeds], "summary": {str(k): v for k, v in summary.items()},
        "goal_met": [list(x) for x in goal_met(summary)], "stage_seconds": seconds, "skipped": skipped,
        "report_split": report_split(table)[0], "budgets": budgets(cfg),
        "recipes": cfg.study.recipes,
        "by_budget": {str(k): {str(b): arms for b, arms in v.items()} for k, v in per_budget.items()}})
    atomic_write_text(storage.join(out, "study.md"), markdown(summary, cfg, seconds, command, skipped, per_budget))
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
