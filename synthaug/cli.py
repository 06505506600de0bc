"""The ``synthaug <stage>`` command line (see DESCRIPTION for what a user reads)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from synthaug import storage
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = ap.parse_known_args(argv)
    args.argv = argv  # the command line, as the run directory's lease names its holder
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
        except ImportError as e:  # a family's optional dependency (OS errors are mapped by class in main)
            raise InputValueError(str(e)) from e
        print(f"synthaug tiny-base: {args.family} base (random weights) in {out}; fine-tune it with "
              f"`synthaug finetune --config c.yaml finetune.family={args.family} finetune.base={out}`")
        return 0

    if args.stage == "fashion-mnist":
        from synthaug.data.idx import fashion_mnist

        for split, loc in fashion_mnist(args.out, args.source).items():
            print(f"synthaug fashion-mnist: {split} -> {loc}")
        return 0

    from synthaug import api

    # Check the config, then every name and path, before any work (and for --dry-run).
    if args.config and not os.path.isfile(args.config) and not storage.is_uri(args.config):
        raise InputNotFound(f"--config: {args.config} does not exist")
    cfg = api.load(args.config, args.overrides)
    if args.stage == "estimate":
        from synthaug.estimate import run as estimate

        print(estimate(cfg, args.gpus, args.gpu_type, train_images=args.train_images, mfu=args.mfu, bench_dir=args.bench_dir))
        return 0
    inputs = {k: getattr(args, k, None) for k in api.INPUTS[args.stage]}
    if args.stage == "study":
        inputs["command"] = " ".join(["synthaug study", *([f"--config {args.config}"] if args.config else []), *args.overrides])
    call = api.check(args.stage, cfg, inputs=inputs)
    print(_plan(args.stage, cfg, args), flush=True)
    if args.dry_run:
        return 0
    # The stage, with the record of this attempt beside the last successful one (see api.Checked.run).
    result = call.run(command=shlex.join(["synthaug", *args.argv]))
    if args.stage == "filter":
        print(json.dumps(result.sets, indent=2, default=str))
    print(api.to_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
