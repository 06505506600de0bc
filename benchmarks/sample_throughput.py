"""Sampling benchmarks: Ray Data throughput vs a plain loop, and denoising steps vs FID.

``--part throughput``: images/s of ``synthaug.generative.sample.run`` (a Ray Data actor
pool, 1 and 2 actors) against a plain single-process loop calling the same
``Sampler.__call__`` on the same plan batches (one torch thread; Ray's 1-CPU actors run
one thread too). The generator is a randomly initialised tiny UNet export (compute does
not depend on the weights). Two numbers per side:

* ``steady_images_per_s``: batches finished after the first round (one batch per actor)
  over the time from the end of that round to the last batch. Ray: from the write times
  of the Parquet shards (one shard per batch); plain: from the loop's clock. Actor
  start-up, model load and the first batch are excluded from both; Ray's includes the
  Parquet write of each batch, the plain loop's does not write.
* ``images_per_s``: all images over the whole call: for Ray the ``sample.run`` wall time
  (Ray start-up excluded, Ray Data planning, actor start-up, model load, writing and
  finalising included), for plain the loop plus the model load.

Both sides sample the same plan, and the images are compared byte for byte.

``--part quality``: in-domain FID of DDPM-1000 (the paper's sampler) against DDIM and
DPM-Solver++ at a few step counts, and the fewest denoiser evaluations that match
DDPM-1000 within seed noise (the standard deviation of FID over DDIM-50 sets with
different seeds, DDIM-50 and DDPM-1000). Needs a trained generator and an in-domain
extractor, both cached under ``runs/bench``: the generator is copied from
``runs/default`` when one trained on the same split exists there, otherwise pretrained
(unconditional, on the pool) and fine-tuned here once; the extractor is trained here
once on ``train_full``. Sampled sets are cached by content key under ``runs/bench/samples``.

``--gpu``: sampling images/s and MFU of random-weight DiT-B/2, DiT-XL/2 and SD-size UNet at
256 px (latent 32x32x4) with the ImageNet config's sampler (DPM-Solver++ 25 steps, w = 1.25,
both CFG passes in one batch, 128 images per batch), bf16 autocast, SD-size VAE decode
included; plain PyTorch, no Ray. Writes ``gpu_throughput`` entries for ``synthaug estimate``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import _common as C


def _cfg(args, extra: list[str] = ()):
    from synthaug.config import load_config

    return load_config(None, [f"work_dir={C.WORK}", f"sample.guidance_scale={args.guidance}",
                              f"sample.batch_size={args.batch_size}", *extra])


# ----------------------------------------------------------------------------- throughput


def random_generator(dirs: dict) -> Path:
    """A randomly initialised tiny UNet export (cached): throughput does not depend on weights."""
    import torch

    from synthaug.artifacts import read_manifest
    from synthaug.generative import models

    out = C.WORK / "generators" / "random-tiny"
    if not (out / "manifest.json").is_file():
        m = read_manifest(dirs["train"])
        torch.manual_seed(0)
        gen = models.new_generator("unet", "tiny", m["class_names"], m["image_size"][0], m["channels"])
        models.save_generator(gen, out, {"stage": "benchmark-random-init"})
    return out


def plain_sampling(gen_dir: Path, s, plan) -> dict:
    """``Sampler.__call__`` over the plan in batches of ``s.batch_size``, in this process."""
    import numpy as np
    import pyarrow as pa
    import torch

    from synthaug.config import to_dict
    from synthaug.generative.sample import Sampler

    torch.set_num_threads(1)  # as a 1-CPU Ray actor
    t0 = time.perf_counter()
    sampler = Sampler(str(gen_dir), to_dict(s), device="cpu")
    load_s = time.perf_counter() - t0
    done, outs = [], []
    t1 = time.perf_counter()
    for i in range(0, plan.num_rows, s.batch_size):
        batch = {k: np.asarray(v) for k, v in plan.slice(i, s.batch_size).to_pydict().items()}  # Ray's numpy format
        outs.append(sampler(batch))
        done.append((time.perf_counter() - t1, len(batch["id"])))
    total = time.perf_counter() - t0
    return {"model_load_seconds": load_s, "loop_seconds": done[-1][0], "seconds": total,
            "images_per_s": plan.num_rows / total, "steady_images_per_s": _steady(done, 1),
            "batches": len(done), "table": pa.concat_tables(outs)}


def _steady(done: list[tuple[float, int]], first_round: int) -> float | None:
    """Rows finished after the first ``first_round`` batches over the time since then."""
    done = sorted(done)
    if len(done) <= first_round:
        return None
    t_first = done[first_round - 1][0]
    rows = sum(n for _, n in done[first_round:])
    return rows / (done[-1][0] - t_first)


def ray_sampling(cfg, gen_dir: Path, actors: int) -> dict:
    """``sample.run`` into a fresh directory; steady rate from the shards' write times."""
    import pyarrow.parquet as pq

    from synthaug.generative import sample

    out = C.WORK / f"sample-throughput-{actors}a-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.time()
    path, manifest = sample.run(cfg, gen_dir, str(out))
    wall = time.time() - t0
    path = Path(path)
    shards = [path / s["path"] for s in manifest["shards"]]  # the shards the manifest lists
    done = [(f.stat().st_mtime - t0, pq.ParquetFile(f).metadata.num_rows) for f in shards]
    one_per_batch = all(n <= cfg.sample.batch_size for _, n in done)
    table = pq.read_table(shards)
    shutil.rmtree(path, ignore_errors=True)
    return {"actors": actors, "seconds": wall, "images_per_s": manifest["num_rows"] / wall,
            "manifest_images_per_s": manifest["images_per_s_this_run"],
            "first_batch_done_seconds": min(t for t, _ in done),
            "steady_images_per_s": _steady(done, actors) if one_per_batch else None,
            "shards": len(shards), "table": table}


def _same_images(a, b) -> bool:
    a, b = a.sort_by("id"), b.sort_by("id")
    return a.column("id").equals(b.column("id")) and a.column("image").equals(b.column("image"))


def throughput(args) -> dict:
    from synthaug import raylocal
    from synthaug.generative.sample import plan_table
    from synthaug.raylocal import init_ray

    # The actor pool, as any set over raylocal.SMALL_MAP_ROWS rows or on a GPU gets it; a set
    # this small on CPU would run in pooled tasks (docs/scale.md).
    raylocal.SMALL_MAP_ROWS = 0

    t_start = time.time()
    dirs = C.digits()
    gen_dir = random_generator(dirs)
    base = [f"sample.per_class={args.tp_per_class}", f"sample.sampler={args.tp_sampler}", f"sample.steps={args.tp_steps}"]
    cfg1 = _cfg(args, base + ["sample.min_actors=1", "sample.max_actors=1"])
    cfg2 = _cfg(args, base + ["sample.min_actors=2", "sample.max_actors=2"])
    from synthaug.artifacts import read_manifest

    plan = plan_table(cfg1.sample, read_manifest(gen_dir)["class_names"])

    t0 = time.time()
    init_ray(cfg1.ray)
    ray_init_s = time.time() - t0
    threads = C.ray_worker_threads()

    runs, tables = {}, {}
    for name, fn in (("plain_before", lambda: plain_sampling(gen_dir, cfg1.sample, plan)),
                     ("ray_1_actor", lambda: ray_sampling(cfg1, gen_dir, 1)),
                     ("ray_2_actors", lambda: ray_sampling(cfg2, gen_dir, 2)),
                     ("plain_after", lambda: plain_sampling(gen_dir, cfg1.sample, plan))):
        before = C.wait_for_quiet(args.max_load, args.max_wait)
        with C.nice_as(threads["niceness"]) if name.startswith("plain") else C.contextlib.nullcontext():
            r = fn()
        tables[name] = r.pop("table")
        runs[name] = {**r, "load_before": before, "load_after": C.load()}
        print(f"{name}: {json.dumps(runs[name])}", flush=True)

    identical = {k: _same_images(tables["plain_before"], t) for k, t in tables.items() if k != "plain_before"}
    plain = statistics.mean(runs[k]["steady_images_per_s"] for k in ("plain_before", "plain_after"))
    plain_total = statistics.mean(runs[k]["images_per_s"] for k in ("plain_before", "plain_after"))
    ratios = {k: {"steady": runs[k]["steady_images_per_s"] / plain if runs[k]["steady_images_per_s"] else None,
                  "whole_call": runs[k]["images_per_s"] / plain_total} for k in ("ray_1_actor", "ray_2_actors")}
    rows = []
    for k, label in (("plain_before", "plain Sampler loop (before)"), ("plain_after", "plain Sampler loop (after)"),
                     ("ray_1_actor", "Ray Data, 1 actor"), ("ray_2_actors", "Ray Data, 2 actors")):
        r = runs[k]
        rows.append({"run": label, "steady img/s": r["steady_images_per_s"], "whole-call img/s": r["images_per_s"],
                     "seconds": r["seconds"], "load1 before/after": f"{r['load_before'][0]}/{r['load_after'][0]}",
                     "ratio steady": ratios.get(k, {}).get("steady"), "ratio whole": ratios.get(k, {}).get("whole_call")})
    print()
    print(C.table(rows, ["run", "steady img/s", "whole-call img/s", "seconds", "ratio steady", "ratio whole", "load1 before/after"],
                  f"sampling: tiny UNet 8x8, {args.tp_sampler}-{args.tp_steps}, w={args.guidance} (2 passes per step, one batch), "
                  f"{plan.num_rows} images in batches of {args.batch_size}; ratio = Ray / mean plain (target >= 0.95 at 1 actor)"))
    print(f"images identical to the plain loop: {identical}; Ray start-up {ray_init_s:.1f}s; part wall {time.time() - t_start:.0f}s")
    return {
        "command": C.command(), "code": C.code_version(), "machine": C.machine(),
        "settings": {"generator": "tiny UNet, random init (compute does not depend on weights)", "sampler": args.tp_sampler,
                     "steps": args.tp_steps, "guidance_scale": args.guidance, "cfg_passes": 2, "batch_size": args.batch_size,
                     "images": plan.num_rows, "plain_torch_threads": 1, "plain_niceness": "set to the Ray workers' (ray_worker_threads.niceness) for the plain runs", "ray_worker_threads": threads},
        "what_is_timed": {
            "steady_images_per_s": "batches after the first round (1 batch per actor) / time from the end of that round to the last batch; Ray from the Parquet shard write times (includes writing), plain from the loop clock; actor start-up and model load excluded",
            "images_per_s": "Ray: all images / sample.run wall (Ray start-up excluded; Ray Data planning, actor start, model load, write, finalize included); plain: loop + model load",
        },
        "ray_init_seconds": round(ray_init_s, 2),
        "runs": runs, "ratios": ratios, "plain_steady_images_per_s_mean": plain, "target_ratio_1_actor": 0.95,
        "images_identical_to_plain": identical, "wall_seconds": round(time.time() - t_start, 1),
    }


# ----------------------------------------------------------------------------- quality


def _same_data(gen_manifest: dict, train_dir: Path) -> bool:
    from synthaug.artifacts import read_manifest

    return gen_manifest.get("data_content_hash") == read_manifest(train_dir)["content_hash"]


def trained_generator(args, dirs: dict) -> tuple[Path, str]:
    """A fine-tuned generator, cached in runs/bench: copied from runs/default when that one was
    trained on the same split, else trained here once (pretrain on the pool, then fine-tune).

    The cache comes first, so every set of one results table shares one generator; a copy,
    not a reference, because runs/default belongs to whoever runs the pipeline next.
    """
    from synthaug.artifacts import read_manifest
    from synthaug.generative import finetune

    gens = C.WORK / "generators"
    pre, ft = gens / "pretrain", gens / "finetune"
    if (ft / "manifest.json").is_file():
        return ft, (ft / "ORIGIN").read_text().strip() if (ft / "ORIGIN").is_file() else "cached runs/bench (trained here)"
    default = C.ROOT / "runs" / "default" / "generators" / "finetune"
    if (default / "manifest.json").is_file() and _same_data(read_manifest(default), dirs["train"]):
        shutil.copytree(default, ft)
        (ft / "ORIGIN").write_text("copied from runs/default/generators/finetune\n")
        return ft, "copied from runs/default"
    cfg = _cfg(args, [f"pretrain.steps={args.pretrain_steps}", f"finetune.steps={args.finetune_steps}"])
    if not (pre / "manifest.json").is_file():
        finetune.run(cfg, "pretrain", dirs["pool"], pre, C.WORK / "ray" / "pretrain", unconditional=True)
    finetune.run(cfg, "finetune", dirs["train"], ft, C.WORK / "ray" / "finetune", base_dir=pre)
    return ft, "trained here (this run)"


def trained_extractor(dirs: dict) -> tuple[Path, str]:
    """The in-domain extractor, cached in runs/bench: trained here on train_full once.

    runs/default's extractor is not borrowed: FIDs are comparable only under one set of
    extractor weights, and that one may be retrained (or deleted) by another run meanwhile.
    """
    from synthaug.artifacts import read_manifest
    from synthaug.classify.train import fit
    from synthaug.config import load_config, replace

    out = C.WORK / "extractor"
    if (out / "model" / "classifier.json").is_file():
        return out / "model", "cached runs/bench (trained here)"
    cfg = load_config(None)
    m = read_manifest(dirs["train_full"])
    ccfg = replace(cfg.classify, epochs=cfg.evaluate.extractor_epochs, num_workers=1)
    fit(ccfg, str(dirs["train_full"]), str(dirs["val"]), seed=0, out_dir=out, name="extractor",
        class_names=m["class_names"], in_chans=m["channels"], save_model=True)
    return out / "model", "trained here (this run)"


def denoiser_rate(gen_dir: Path, batch: int) -> float:
    """Denoiser evaluations (images x passes) per second, one thread, for a cost estimate."""
    import torch

    from synthaug.generative import models

    torch.set_num_threads(1)
    gen = models.load_generator(gen_dir)
    gen.model.eval()
    x, t, y = torch.randn(2 * batch, gen.channels, gen.image_size, gen.image_size), torch.full((2 * batch,), 500), torch.zeros(2 * batch, dtype=torch.long)
    with torch.inference_mode():
        gen.denoise(x, t, y)
        seconds = C.time_cuda(lambda: gen.denoise(x, t, y), 5, "cpu")
    return 2 * batch / seconds


def extreme_pixels(path: Path) -> float:
    """Share of pixels at exactly 0 or 255: digits have a black background, washed-out samples do not."""

    from synthaug.artifacts import read_table
    from synthaug.data.images import decode_batch

    u8 = decode_batch(read_table(path, columns=["image"]).column("image").to_pylist())
    return float(((u8 == 0) | (u8 == 255)).mean())


def quality(args) -> dict:
    from synthaug.evaluate.fidelity import compute_fidelity
    from synthaug.generative import sample
    from synthaug.raylocal import init_ray

    t_start = time.time()
    dirs = C.digits()
    init_ray()
    gen_dir, gen_how = trained_generator(args, dirs)
    ext_dir, ext_how = trained_extractor(dirs)
    print(f"generator {gen_dir} ({gen_how}); extractor {ext_dir} ({ext_how})", flush=True)

    # Cost estimate of the DDPM-1000 set before sampling it.
    n_images = 10 * args.per_class
    rate = denoiser_rate(gen_dir, args.batch_size)
    from synthaug.generative.diffusion import cfg_passes

    passes = cfg_passes(args.guidance)
    ddpm_estimate = n_images * 1000 * passes / rate / args.actors
    print(f"denoiser: {rate:.0f} evaluations/s/thread; DDPM-1000 on {n_images} images with {args.actors} actors: "
          f"~{ddpm_estimate:.0f}s of compute (load {C.load()})", flush=True)

    settings = [("ddpm", 1000, 0)] + [("ddpm", 1000, s) for s in range(1, args.ddpm_seeds)]
    settings += [(smp, st, 0) for smp in ("ddim", "dpmsolver++") for st in args.steps_list]
    settings += [("ddim", args.noise_steps, s) for s in range(1, args.noise_seeds)]
    results = []
    for smp, steps, seed in settings:
        cfg = _cfg(args, [f"sample.per_class={args.per_class}", f"sample.sampler={smp}", f"sample.steps={steps}",
                          f"sample.seed={seed}", f"sample.min_actors={args.actors}", f"sample.max_actors={args.actors}"])
        load_before = C.load()
        t0 = time.time()
        out, man = sample.run(cfg, gen_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-sample FID warning: recorded as a flag
            m = compute_fidelity(dirs["val"], out, ext_dir, cfg.evaluate, C.WORK / "fid-cache")
        r = {"sampler": smp, "steps": steps, "seed": seed, "denoiser_evals_per_image": steps * passes,
             "fid": m["fid"], "kid_mean": m["kid_mean"], "precision": m["precision"], "recall": m["recall"],
             "extreme_pixel_fraction": extreme_pixels(out), "n_synthetic": m["n_synthetic"], "n_real": m["n_real"], "fid_small_sample_warning": m["fid_small_sample_warning"],
             "sample_dir": str(Path(out).relative_to(C.ROOT)), "sampled_seconds": man.get("seconds_this_run"),
             "sampled_images_per_s": man.get("images_per_s_this_run"), "wall_seconds": round(time.time() - t0, 1),
             "load_before": load_before, "load_after": C.load()}
        results.append(r)
        print(f"{smp}-{steps} seed {seed}: FID {r['fid']:.3f} ({r['wall_seconds']}s)", flush=True)

    # Seed noise: FID standard deviation over the repeated sets (DDIM-noise_steps, and DDPM-1000 if repeated).
    def fids(smp, steps):
        return [r["fid"] for r in results if r["sampler"] == smp and r["steps"] == steps]

    noise_sets = {f"ddim-{args.noise_steps}": fids("ddim", args.noise_steps), "ddpm-1000": fids("ddpm", 1000)}
    sd_by_setting = {k: statistics.stdev(f) for k, f in noise_sets.items() if len(f) > 1}
    sds = list(sd_by_setting.values())
    sd = math.sqrt(statistics.mean(s * s for s in sds)) if sds else float("nan")  # pooled over settings
    ref = [r for r in results if r["sampler"] == "ddpm" and r["seed"] == 0][0]
    ref_fid = statistics.mean(fids("ddpm", 1000))  # over its seeds
    threshold = ref_fid + 2 * sd
    matches = [r for r in results if r["seed"] == 0 and r["sampler"] != "ddpm" and r["fid"] <= threshold]
    fewest_evals = min((r["denoiser_evals_per_image"] for r in matches), default=None)
    fewest = [r for r in matches if r["denoiser_evals_per_image"] == fewest_evals]

    rows = [{"sampler": r["sampler"], "steps": r["steps"], "seed": r["seed"], "evals/img": r["denoiser_evals_per_image"],
             "FID": r["fid"], "KID": r["kid_mean"], "precision": r["precision"], "recall": r["recall"],
             "px 0/255": r["extreme_pixel_fraction"],
             "match": ("ref" if r["sampler"] == "ddpm" else "(noise)" if r["seed"] else "yes" if r["fid"] <= threshold else "no")}
            for r in results]
    print()
    print(C.table(rows, ["sampler", "steps", "seed", "evals/img", "FID", "KID", "precision", "recall", "px 0/255", "match"],
                  f"in-domain FID vs real val ({ref['n_real']} images), {n_images} synthetic images per set, w={args.guidance}; "
                  f"match = FID <= mean DDPM-1000 + 2 sd (pooled seed sd {sd:.3f}; by setting {', '.join(f'{k} {v:.3f}' for k, v in sd_by_setting.items())})"))
    print(f"DDPM-1000 FID {ref_fid:.3f} (mean of {len(fids('ddpm', 1000))} seeds); threshold {threshold:.3f}; "
          "fewest denoiser evaluations matching it: "
          + (f"{fewest_evals} evals/image vs {1000 * passes} ({', '.join(r['sampler'] + '-' + str(r['steps']) for r in fewest)})"
             + (" -- the fewest tried, so fewer may match too" if fewest_evals == min(args.steps_list) * passes else "")
             if fewest else "none"))
    return {
        "command": C.command(), "code": C.code_version(), "machine": C.machine(),
        "settings": {"per_class": args.per_class, "images_per_set": n_images, "guidance_scale": args.guidance,
                     "cfg_passes": passes, "batch_size": args.batch_size, "actors": args.actors,
                     "steps_list": args.steps_list, "ddpm": "DDPM-1000 ancestral, log-variance coefficient v = 1.0 (beta_t)",
                     "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                     "real_set": "digits val split", "extractor": "in-domain (synthaug_cnn_tiny on train_full), pre_logits features",
                     "noise": f"sd of FID over seeds 0..{args.noise_seeds - 1} of ddim-{args.noise_steps}"
                              + (f" and 0..{args.ddpm_seeds - 1} of ddpm-1000" if args.ddpm_seeds > 1 else "")},
        "generator": {"path": str(Path(gen_dir).relative_to(C.ROOT)), "how": gen_how},
        "extractor": {"path": str(Path(ext_dir).relative_to(C.ROOT)), "how": ext_how},
        "denoiser_evals_per_s_per_thread": rate, "ddpm1000_compute_estimate_seconds": ddpm_estimate,
        "real_extreme_pixel_fraction": extreme_pixels(dirs["val"]),
        "results": results, "fid_seed_sd": sd, "fid_seed_sd_by_setting": sd_by_setting, "match_threshold_fid": threshold,
        "ddpm1000_fid_mean": ref_fid,
        "match_rule": "seed-0 set's FID <= mean DDPM-1000 FID + 2 x pooled seed sd",
        "fewest_matching_evals_per_image": fewest_evals,
        "fewest_matching": [{k: r[k] for k in ("sampler", "steps", "denoiser_evals_per_image", "fid", "kid_mean")} for r in fewest],
        "fewest_is_smallest_tried": fewest_evals == min(args.steps_list) * passes if fewest else None,
        "wall_seconds": round(time.time() - t_start, 1),
    }


# ----------------------------------------------------------------------------- GPU mode


def gpu_sampling(name: str, batch: int, steps: int, device: str = "cuda", image_px: int = 256,
                 guidance: float = 1.25, sampler: str = "dpmsolver++", dtype=None, **overrides) -> dict:
    """Sample a batch with CFG (cond + uncond in one batch of 2B) from a random-weight large denoiser, then decode.

    ``images_per_s`` includes the SD-size VAE decode of the batch (what sampling does);
    ``denoiser_images_per_s`` is the denoising loop alone.
    """
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from synthaug.generative.diffusion import cfg_passes

    dtype = dtype or torch.bfloat16
    model, make_inputs = C.build_gpu_model(name, image_px, **overrides)
    model = model.to(device).eval()
    cuda = str(device).startswith("cuda")
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    vae = C.build_gpu_vae().to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", timestep_spacing="trailing")
    if sampler == "dpmsolver++":
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    elif sampler == "ddim":
        sched = DDIMScheduler(**common)
    else:
        raise ValueError(f"--gpu-sampler {sampler!r}: ddim or dpmsolver++")
    cond = make_inputs(batch, device)
    uncond = make_inputs(batch, device)  # a different label / text state stands in for the null condition
    x_key = "hidden_states" if "hidden_states" in cond else "sample"
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond if k not in (x_key, "timestep")}
    c = cond[x_key].shape[1]
    passes = cfg_passes(guidance)

    def forward(x, t):
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            if passes == 1:
                return C.gpu_output(model(**{x_key: x, "timestep": t.expand(batch), **cond}))[:, :c].float()
            out = C.gpu_output(model(**{x_key: torch.cat([x, x]), "timestep": t.expand(2 * batch), **both}))
        e_c, e_u = out[:, :c].float().chunk(2)  # DiT's learned-sigma channels dropped
        return e_u + guidance * (e_c - e_u)

    @torch.inference_mode()
    def denoise():
        sched.set_timesteps(steps, device=device)
        x = torch.randn_like(cond[x_key])
        for t in sched.timesteps:
            x = sched.step(forward(x, t.reshape(1)), t, x).prev_sample
        return x

    @torch.inference_mode()
    def decode(z):
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            return vae.decode(z / 0.18215).sample

    z = denoise()  # warm-up (leaves the schedule's timesteps set)
    decode(z)
    with torch.inference_mode():
        flops_per_forward = C.count_flops(lambda: forward(cond[x_key], sched.timesteps[:1]))
        flops_decode = C.count_flops(lambda: decode(z))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = C.time_cuda(denoise, 1, device)
    decode_seconds = C.time_cuda(lambda: decode(z), 3, device)
    flops = flops_per_forward * steps + flops_decode
    total = seconds + decode_seconds
    return {"model": name, "params": params, "batch": batch, "image_px": image_px, "latent": image_px // 8,
            "sampler": sampler, "steps": steps, "guidance": guidance, "cfg_passes": passes,
            "seconds": total, "denoise_seconds": seconds, "decode_seconds": decode_seconds,
            "images_per_s": batch / total, "denoiser_images_per_s": batch / seconds,
            "flops_per_image": flops / batch, "achieved_flops": flops / total,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def gpu(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (torch.cuda.is_available() is False); nothing measured")
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.time()
    name = torch.cuda.get_device_name(0)
    ceiling = C.bf16_matmul_ceiling()
    rows = []
    for model in ("dit-b-2", "dit-xl-2", "sd-unet"):
        r = gpu_sampling(model, args.gpu_batch, args.gpu_steps, guidance=args.gpu_guidance, sampler=args.gpu_sampler)
        r["mfu"] = r["achieved_flops"] / ceiling
        rows.append(r)
        print(f"  {model}: {r['images_per_s']:.1f} images/s", flush=True)
    print(C.table([{**r, "TFLOP/s": r["achieved_flops"] / 1e12, "peak GiB": r["peak_memory_bytes"] / 2**30} for r in rows],
                  ["model", "params", "batch", "steps", "images_per_s", "denoiser_images_per_s", "TFLOP/s", "mfu", "peak GiB"],
                  f"sampling, {args.gpu_sampler} {args.gpu_steps} steps, w={args.gpu_guidance:g} (CFG passes batched), "
                  f"bf16 autocast, 256 px, VAE decode included, {name}; bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s"))
    return {"command": C.command(), "mode": "gpu", "device_name": name, "bf16_matmul_ceiling_flops": ceiling,
            "settings": {"precision": "bf16 autocast", "weights": "random", "sampler": args.gpu_sampler,
                         "steps": args.gpu_steps, "guidance": args.gpu_guidance, "batch": args.gpu_batch,
                         "flops": "torch.utils.flop_counter, one batched CFG forward x steps + VAE decode",
                         "excluded": "text encoder, PNG encoding, writing"},
            "results": rows,
            "gpu_throughput": [C.gpu_record("sample", r["model"], r["image_px"], r["images_per_s"], name, batch=r["batch"],
                                            sampler=r["sampler"], steps=r["steps"], cfg_passes=r["cfg_passes"],
                                            vae_decode=True) for r in rows],
            "wall_seconds": round(time.time() - t_start, 1)}


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("throughput", "quality", "all"), default="throughput")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-load", type=float, default=1.0, help="wait for the 1-min load to drop below this before each run")
    p.add_argument("--max-wait", type=float, default=90.0, help="seconds to wait for --max-load at most")
    p.add_argument("--tp-per-class", type=int, default=64, help="throughput: images per class (10 classes)")
    p.add_argument("--tp-sampler", default="ddim")
    p.add_argument("--tp-steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=50, help="quality: images per class per set")
    p.add_argument("--actors", type=int, default=2, help="quality: sampling actors")
    p.add_argument("--steps-list", type=int, nargs="+", default=[5, 10, 25, 50])
    p.add_argument("--noise-steps", type=int, default=50, help="quality: DDIM steps of the seed-noise sets")
    p.add_argument("--noise-seeds", type=int, default=3)
    p.add_argument("--ddpm-seeds", type=int, default=3)
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--gpu", action="store_true", help="DiT-B/2, DiT-XL/2 and SD-UNet sampling on CUDA (no Ray)")
    p.add_argument("--gpu-batch", type=int, default=128, help="per GPU (the ImageNet config's sample.batch_size)")
    p.add_argument("--gpu-steps", type=int, default=25)
    p.add_argument("--gpu-sampler", default="dpmsolver++", choices=("dpmsolver++", "ddim"))
    p.add_argument("--gpu-guidance", type=float, default=1.25)
    args = p.parse_args()

    if args.gpu:
        C.write_result("sample_gpu", gpu(args))
        return
    # One JSON for both parts; running one part keeps the other's last result.
    path = C.RESULTS / "sample.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    parts = {k: doc[k] for k in ("throughput", "quality") if k in doc}
    for part in (("throughput", "quality") if args.part == "all" else (args.part,)):
        parts[part] = throughput(args) if part == "throughput" else quality(args)
    C.write_result("sample", {"mode": "cpu", **parts})


if __name__ == "__main__":
    main()
