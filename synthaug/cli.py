"""The ``synthaug <stage>`` command line (see DESCRIPTION for what a user reads)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from synthaug import pipeline as P
from synthaug import storage
from synthaug.artifacts import read_manifest
from synthaug.errors import InputNotFound, InputValueError, find_input_error, first_line

STAGES = {
    "run": "the whole default pipeline: ingest, pretrain, finetune, sample, evaluate, classify, sweep, pseudo-label, report",
    "ingest": "real images -> contract datasets (train / val / pool)",
    "pretrain": "unconditional generator pretraining on the unlabelled pool (Ray Train)",
    "finetune": "class-conditional generator fine-tuning (Ray Train)",
    "sample": "class-balanced sampling with CFG (Ray Data actor pool)",
    "evaluate": "FID / IS / KID / PR (torch-fidelity), near-copy audit, CAS",
    "classify": "train classifiers on a real / synthetic mix (Ray Train)",
    "sweep": "Ray Tune over guidance x mixing ratio",
    "pseudolabel": "the pseudo-label baseline: a real-only teacher labels the unlabelled pool; students train on both",
    "filter": "keep synthetic images the real-only teacher gives their class a probability >= filter.tau",
    "study": "the recipe's arms (real only, pseudo-label, real + synthetic per sweep setting) over study.k_per_class x study.draws x seeds, with paired differences",
    "config-reference": "print the config reference (markdown)",
    "tiny-base": "save a tiny random-weight base of a generator family (diffusers layout), to try `finetune --base`",
    "estimate": "GPU-hours and wall time per stage of a config, from GPU benchmarks or FLOP counts",
    "fashion-mnist": "convert the Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) to train/test Parquet for ingest",
}
NO_CONFIG = ("config-reference", "tiny-base", "fashion-mnist")  # commands that read no run config
DESCRIPTION = """\
synthaug STAGE [--config x.yaml] [key.sub=value ...] [--dry-run] [--debug]

Every stage takes the same YAML config (one section per stage) plus dotted
overrides. Inputs and outputs default to the run layout under work_dir/<name>
and results_dir/<name>, and can be named with the stage's path options.
The config and every name and path in it are checked before any work;
--dry-run checks them, prints the plan and exits. Errors in the input print
one line and exit with code 2 (--debug, or SYNTHAUG_DEBUG=1, shows the
traceback).
"""
# The config keys each stage's plan shows (the whole config is in the run directory).
PLAN_KEYS = {
    "ingest": ("source", "path", "image_size", "k_per_class", "val_fraction"),
    "pretrain": ("family", "base", "arch", "steps", "batch_size", "lr", "num_workers", "use_gpu"),
    "finetune": ("family", "base", "arch", "steps", "batch_size", "lr", "num_workers", "use_gpu"),
    "sample": ("per_class", "guidance_scale", "sampler", "steps", "batch_size", "max_actors"),
    "evaluate": ("extractor", "max_samples", "batch_size", "max_actors"),
    "classify": ("model", "epochs", "batch_size", "lr", "seeds", "num_workers", "use_gpu"),
    "sweep": ("guidance_scales", "ratios", "max_concurrent", "name"),
    "pseudolabel": ("select", "threshold", "top_fraction", "teacher_seed", "with_synthetic"),
    "filter": ("tau",),
    "study": ("k_per_class", "draws", "headline_k"),
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="synthaug", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help in STAGES.items():
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--debug", action="store_true", help="show the traceback of an input error (also: SYNTHAUG_DEBUG=1)")
        sp.add_argument("--verbose", action="store_true",
                        help="show Ray's own console output too: Train reports, Ray Data logs and progress bars (also: SYNTHAUG_VERBOSE=1)")
        if name == "tiny-base":
            sp.add_argument("--family", required=True, choices=("unet", "dit", "text2image"), help="generator family")
            sp.add_argument("--out", required=True, help="directory to create (must not hold anything yet)")
            sp.add_argument("--image-size", type=int, default=8, help="unet only: pixel size (latent families: 8 px native)")
            sp.add_argument("--channels", type=int, default=1, help="unet only: image channels")
        if name == "fashion-mnist":
            from synthaug.data.idx import FASHION_MNIST_DIR

            sp.add_argument("--out", required=True, help="directory for train.parquet and test.parquet")
            sp.add_argument("--source", default=FASHION_MNIST_DIR, help="directory holding the four IDX files")
        if name in NO_CONFIG:
            continue
        sp.add_argument("--config", help="YAML config (defaults: synthaug/config.py)")
        sp.add_argument("--dry-run", action="store_true", help="check the config, names and paths, print the plan and exit")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sample.guidance_scale=1.5")
        if name == "estimate":
            from synthaug.estimate import GPU_PEAK_TFLOPS, IMAGENET_TRAIN_IMAGES

            sp.add_argument("--gpus", type=int, default=8, help="GPUs the stages spread over")
            sp.add_argument("--gpu-type", default="h100", choices=sorted(GPU_PEAK_TFLOPS), help="GPU model (bf16 peak)")
            sp.add_argument("--train-images", type=int, default=IMAGENET_TRAIN_IMAGES, help="real images ingested (default ImageNet-1K train)")
            sp.add_argument("--mfu", type=float, help="one assumed MFU for every stage (default: per stage, see synthaug/estimate.py)")
            sp.add_argument("--bench-dir", default="results/bench", help="where GPU benchmark JSONs are read from")
        if name in ("pretrain", "finetune", "classify", "pseudolabel", "filter"):
            sp.add_argument("--data", help="input contract dataset (default: from the run layout)")
        if name in ("pretrain", "finetune", "sample"):
            sp.add_argument("--out", help="output directory (default: from the run layout)")
        if name == "finetune":
            sp.add_argument("--base", help="local base generator directory (diffusers layout)")
        if name == "sample":
            sp.add_argument("--generator", help="exported generator directory")
        if name in ("evaluate", "classify", "pseudolabel", "filter"):
            sp.add_argument("--real", help="real val/reference contract dataset")
            sp.add_argument("--synthetic", nargs="*", default=[], help="synthetic contract dataset(s)")
        if name == "pseudolabel":
            sp.add_argument("--pool", help="unlabelled pool contract dataset (default: the run's data/pool)")
            sp.add_argument("--ratio", type=float, default=1.0,
                            help="with --synthetic: synthetic:real ratio of the pseudo-label + synthetic students")
        if name == "evaluate":
            sp.add_argument("--extractor", help="saved in-domain classifier dir (default: train one)")
            sp.add_argument("--train", help="real train set for the near-copy audit")
        if name == "classify":
            sp.add_argument("--ratio", type=float, default=1.0, help="synthetic:real ratio (0 = real only)")
            sp.add_argument("--synthetic-only", action="store_true", help="train on synthetic only (CAS)")
    return ap


def _plan(stage: str, cfg, args) -> str:
    """A short plan for a person: stage, where it reads and writes, the keys that matter."""
    from synthaug.pipeline import RunPaths

    p = RunPaths(cfg)
    lines = [f"synthaug {stage}: {STAGES[stage]}", f"  work dir:    {p.work}", f"  results dir: {p.results}"]
    for key in ("data", "base", "generator", "real", "synthetic", "extractor", "train", "out", "ratio", "pool"):
        value = getattr(args, key, None)
        if value not in (None, [], ""):
            lines.append(f"  --{key}: {' '.join(map(str, value)) if isinstance(value, list) else value}")
    shown_secs = ["sweep", "pseudolabel", "filter", "study"] if stage == "study" else PLAN_KEYS if stage == "run" else [stage] if stage in PLAN_KEYS else []
    for sec in shown_secs:
        section = getattr(cfg, sec)
        shown = " ".join(f"{k}={getattr(section, k)!r}" if isinstance(getattr(section, k), str) else f"{k}={getattr(section, k)}"
                         for k in PLAN_KEYS[sec] if getattr(section, k) not in ("", None))
        lines.append(f"  {sec}: {shown}")
    lines.append(f"  (the whole resolved config is written to {storage.join(p.work, f'config.{stage}.yaml')})")
    return "\n".join(lines)


def entry(argv: list[str] | None = None) -> None:
    """The console script and job entrypoints: :func:`main`, then a prompt exit.

    Once the command's results are written and printed, Ray is shut down and the process
    ends without Python's interpreter teardown (measured here: about 1-2 s of module and
    thread finalisation with torch, timm and Ray loaded, on every stage command).
    """
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    # Dotted overrides may also follow the options (`--ratio 1 classify.epochs=5`), which
    # argparse alone rejects once the positional list has been filled.
    args, extra = ap.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    debug = args.debug or os.environ.get("SYNTHAUG_DEBUG", "") not in ("", "0")
    if args.verbose:
        os.environ["SYNTHAUG_VERBOSE"] = "1"
    try:
        return _main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"synthaug {args.stage}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BaseException as e:
        err = find_input_error(e)
        if err is None or debug:
            raise
        # Refused for its input: this attempt's config record goes too (earlier records stay).
        if getattr(args, "attempt_record", None):
            storage.delete(args.attempt_record)
        print(f"synthaug {args.stage}: error: {first_line(err)}", file=sys.stderr)
        return 2


def _main(args) -> int:
    if args.stage == "config-reference":
        from synthaug.config import reference_markdown

        print(reference_markdown())
        return 0
    if args.stage == "tiny-base":
        from synthaug.generative.tiny import save_tiny_base

        try:
            out = save_tiny_base(args.family, args.out, args.image_size, args.channels)
        except (FileExistsError, ImportError) as e:
            raise InputValueError(str(e)) from e
        print(f"synthaug tiny-base: {args.family} base (random weights) in {out}; fine-tune it with "
              f"`synthaug finetune --config c.yaml finetune.family={args.family} finetune.base={out}`")
        return 0

    if args.stage == "fashion-mnist":
        from synthaug.data.idx import fashion_mnist

        for split, loc in fashion_mnist(args.out, args.source).items():
            print(f"synthaug fashion-mnist: {split} -> {loc}")
        return 0

    from synthaug.checks import check_inputs
    from synthaug.config import dump_config, load_config
    from synthaug.pipeline import RunPaths

    # Check the config, then every name and path, before any work (and for --dry-run).
    if args.config and not os.path.isfile(args.config) and not storage.is_uri(args.config):
        raise InputNotFound(f"--config: {args.config} does not exist")
    cfg = load_config(args.config, args.overrides)
    if args.stage == "estimate":
        from synthaug.estimate import run as estimate

        print(estimate(cfg, args.gpus, args.gpu_type, train_images=args.train_images, mfu=args.mfu, bench_dir=args.bench_dir))
        return 0
    check_inputs(cfg, args.stage, args)
    print(_plan(args.stage, cfg, args), flush=True)
    if args.dry_run:
        return 0
    # The record of this attempt sits beside the last successful one, which only a
    # successful run replaces: a failed run never changes an earlier run's records.
    work = RunPaths(cfg).work
    args.attempt_record = dump_config(cfg, work, f"config.{args.stage}.attempt.yaml")
    if args.stage in ("run", "study"):  # they open their own parent run, with a child per stage
        result = _dispatch(args, cfg)
    else:
        from synthaug import tracking

        with tracking.run(cfg, args.stage):
            result = _dispatch(args, cfg)
            tracking.final(result)
    dump_config(cfg, work, f"config.{args.stage}.yaml")
    storage.delete(args.attempt_record)
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------- stage adapters
# The CLI's glue around the library stages in synthaug.pipeline: they resolve defaults
# from the run layout, loop over seeds or sets, and write the command's report.


def evaluate_cli(cfg, real, synthetic: list, extractor, train) -> dict:
    """``synthaug evaluate``: metrics for each synthetic set into <results>/<name>/evaluate/."""
    from synthaug import report
    from synthaug.artifacts import is_complete

    p = P.RunPaths(cfg)
    real = real or p.data("val")
    extractor = extractor or P.stage_extractor(cfg)
    if not synthetic:
        raise InputValueError("synthaug evaluate: give at least one --synthetic <dataset dir>")
    labelled_train = p.data("train") if is_complete(p.data("train")) else None
    rows = []
    for d in synthetic:
        m = P.stage_evaluate(cfg, real, d, extractor, train, labelled_train=labelled_train)
        flat = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
        flat["guidance_scale"] = float(read_manifest(d).get("sample", {}).get("guidance_scale", float("nan")))
        rows.append(flat)
    out = storage.join(str(p.results), "evaluate")
    for i, r in enumerate(rows):
        report.write_metrics(out, r, name=f"metrics_{i}" if len(rows) > 1 else "metrics")
    if len(rows) > 1:
        report.plot_vs_guidance([{**r, "cas": r.get("cas_top1_mean"), "cas_std": r.get("cas_top1_std")} for r in rows],
                                storage.join(out, "fidelity_vs_guidance.png"))
    return rows[0] if len(rows) == 1 else {"evaluated": len(rows), "out": str(out)}


def classify_cli(cfg, data, real, synthetic: list, ratio: float, synthetic_only: bool) -> dict:
    """``synthaug classify``: one mix, every seed, through Ray Train; mean and std of top-1.

    The mixtures are planned from the datasets' locations (all checks before any
    training); the workers stream the rows.
    """
    import numpy as np

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
                        in_chans=int(m["channels"]), ray_cfg=cfg.ray))
    top1 = np.array([r["top1"] for r in runs])
    return {"top1_mean": float(top1.mean()), "top1_std": float(top1.std(ddof=1)) if len(top1) > 1 else None,
            "seeds": len(runs), "n_train": runs[0]["n_train"]}


def sweep_cli(cfg, _overrides) -> dict:
    """``synthaug sweep``: sample each (guidance, strength) and filter each tau once (reused by
    content hash), then Ray Tune over the settings x ratios x seeds."""
    from synthaug.sweep import run_sweep, settings

    p = P.RunPaths(cfg)
    _, mix_sets, _, _ = P.synthetic_sets(cfg, headline=False)
    grid = set(settings(cfg))
    df = run_sweep(cfg, p.data("train"), p.data("val"), {k: v for k, v in mix_sets.items() if k in grid},
                   storage.join(p.results, cfg.sweep.name), name=cfg.sweep.name, storage_dir=p.ray)
    return df.attrs["summary"]


def _top1(runs: list[dict]) -> tuple[float, float | None]:
    import numpy as np

    t = np.array([r["top1"] for r in runs])
    return float(t.mean()), (float(t.std(ddof=1)) if len(t) > 1 else None)


def pseudolabel_cli(cfg, data, real, pool, synthetic: list, ratio: float) -> dict:
    """``synthaug pseudolabel``: teacher, pseudo-labelled pool, students; paired with real-only by seed.

    Real-only runs are those of ``synthaug classify --ratio 0`` (same keys, same place),
    so either command reuses the other's.
    """
    from synthaug.classify.pseudolabel import real_only_runs

    p = P.RunPaths(cfg)
    train, val = str(data or p.data("train")), str(real or p.data("val"))
    teacher = P.stage_teacher(cfg, train, val)
    res = P.stage_pseudolabel(cfg, train, val, pool, teacher=teacher, synthetic=synthetic[0] if synthetic else None,
                              ratio=ratio)
    real_runs = {r["seed"]: r["top1"] for r in real_only_runs(cfg, train, val, storage.join(p.work, "classify"))}
    out = {"dataset": res["dataset"], "n_pseudo": res["n_pseudo"], "pool_rows": res["pool_rows"],
           "kept_share": res["kept_share"], "teacher_top1": res["teacher_top1"]}
    out["real_only_top1_mean"], out["real_only_top1_std"] = _top1([{"top1": v} for v in real_runs.values()])
    for name in ("students", "combined"):
        if name not in res:
            continue
        tag = "pseudo_label" if name == "students" else "pseudo_plus_synthetic"
        out[f"{tag}_top1_mean"], out[f"{tag}_top1_std"] = _top1(res[name])
        diffs = [{"top1": r["top1"] - real_runs[r["seed"]]} for r in res[name]]
        out[f"{tag}_gain_mean"], out[f"{tag}_gain_std"] = _top1(diffs)
    return out


def filter_cli(cfg, data, real, synthetic: list) -> dict:
    """``synthaug filter``: each --synthetic set filtered by the teacher; the share kept per class."""
    from synthaug.classify.pseudolabel import kept_per_class

    if not synthetic:
        raise InputValueError("synthaug filter: give at least one --synthetic <dataset dir>")
    if cfg.filter.tau <= 0:
        raise InputValueError("synthaug filter: config key 'filter.tau' is 0 (off); set e.g. filter.tau=0.5")
    p = P.RunPaths(cfg)
    teacher = P.stage_teacher(cfg, str(data or p.data("train")), str(real or p.data("val")))
    out = {}
    for d in synthetic:
        loc, m = P.stage_filter(cfg, d, teacher)
        out[str(d)] = {"filtered": loc, "kept": m["num_rows"], "kept_per_class": kept_per_class(m)}
    print(json.dumps(out, indent=2, default=str))
    return {"sets": len(out), "kept": sum(v["kept"] for v in out.values())}


def _dispatch(args, cfg):

    s = args.stage
    if s == "run":
        return P.run_all(cfg)
    if s == "study":
        from synthaug.study import run_study

        command = " ".join(["synthaug study", *([f"--config {args.config}"] if args.config else []), *args.overrides])
        return run_study(cfg, command=command)
    if s == "ingest":
        return {k: m["num_rows"] for k, m in P.stage_ingest(cfg).items()}
    if s == "pretrain":
        return P.stage_pretrain(cfg, args.data, args.out)
    if s == "finetune":
        return P.stage_finetune(cfg, args.data, args.base, args.out)
    if s == "sample":
        out, manifest = P.stage_sample(cfg, args.generator, args.out)
        return {"dataset": str(out), **manifest}
    if s == "evaluate":
        return evaluate_cli(cfg, args.real, args.synthetic, args.extractor, args.train)
    if s == "classify":
        return classify_cli(cfg, args.data, args.real, args.synthetic, args.ratio, args.synthetic_only)
    if s == "sweep":
        return sweep_cli(cfg, args.overrides)
    if s == "pseudolabel":
        return pseudolabel_cli(cfg, args.data, args.real, args.pool, args.synthetic, args.ratio)
    if s == "filter":
        return filter_cli(cfg, args.data, args.real, args.synthetic)
    raise AssertionError(s)


if __name__ == "__main__":
    sys.exit(main())
