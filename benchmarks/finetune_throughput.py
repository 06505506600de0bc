"""Generator training throughput: the library's loop on Ray vs a plain PyTorch loop of the same step.

CPU mode (default): ``synthaug.generative.finetune.run`` (1 worker: one Ray task; tiny UNet,
8x8 digits, class-conditional fine-tuning on the 10-per-class split) against a plain
single-process loop (``finetune.plain_loop``) that drives the worker's own step object,
``finetune.TrainCore`` -- the same construction and seeding, label dropout, loss, clip,
AdamW, cosine LR schedule and EMA -- over the same micro-batch stream
(``finetune.plan_tensors``: the worker's per-epoch shard order, rank slice and shuffle
buffer), with the data decoded in memory beforehand. The Ray side reads the decoded set
from the object-store cache (``finetune.cache=true``; ``--no-cache`` streams Parquet): the
100 rows make one micro-batch an epoch, and an uncached epoch starts a Ray Data pipeline. Both use one torch thread (the Ray worker sets ``torch.set_num_threads(1)``;
the plain loop does the same).

Numbers per side:

* ``images_per_s``: the whole loop, first step included. For Ray this is the figure the
  worker itself reports into the export manifest (its clock starts when the worker enters
  the loop, so the Ray Data pipeline's first-batch latency is inside, Ray/worker start-up
  and the final checkpoint are not).
* ``steady_images_per_s``: from the end of step 50 to the last step (warm-up and the
  pipeline start excluded). For Ray it is recovered from the worker's own cumulative
  "step N ... img/s" log lines (t_N = images_N / rate_N).

The plain loop runs before and after the Ray run and the ratio uses their mean, so a
change in background load during the run shows up as a spread between the two.

GPU mode (``--gpu``, CUDA only, no Ray): one training step (SD-size VAE encode, then bf16
autocast, fp32 master weights, fused AdamW) of a randomly initialised DiT-B/2, DiT-XL/2 or
SD-size UNet at 256 px, batch 64 per GPU as the ImageNet config; reports images/s (and the
denoiser's step alone), MFU against a measured bf16 matmul ceiling and peak memory, and
writes ``gpu_throughput`` entries that ``synthaug estimate`` uses as measured figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import _common as C


# ----------------------------------------------------------------------------- plain loop


def plain_loop(cfg, data_dir: Path, warm_step: int = 50) -> dict:
    """The Ray worker's step (``finetune.TrainCore``, rank 0, no resume) in this process, over the same batch stream."""
    import torch

    from synthaug.artifacts import read_manifest
    from synthaug.generative import finetune

    t = cfg.finetune
    torch.set_num_threads(1)  # as the Ray worker
    manifest = read_manifest(data_dir)

    # Decode the micro-batches the Ray worker streams, into memory (not timed).
    xs, ys = finetune.plan_tensors(data_dir, t)  # (N, C, H, W), (N,)
    core = finetune.TrainCore(t, "", list(manifest["class_names"]), int(manifest["image_size"][0]),
                              int(manifest["channels"]))
    core.begin()

    warm: dict = {}

    def on_step(c) -> None:
        if c.step == warm_step:
            warm.update(t=time.perf_counter(), images=c.images)

    t0 = time.perf_counter()
    finetune.plain_loop(core, xs, ys, on_step)
    t_end = time.perf_counter()
    seconds = t_end - t0
    steady = (core.images - warm["images"]) / (t_end - warm["t"]) if warm else None
    return {"steps": core.step, "images": core.images, "seconds": round(seconds, 3), "images_per_s": core.images / seconds,
            "steady_images_per_s": steady, "final_loss": core.last_loss, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- Ray loop


_STEP_LINE = re.compile(r"\[finetune\] step (\d+)/(\d+) loss \S+ (\d+) img/s")


def worker_step_lines(since: float) -> list[tuple[int, int]]:
    """(step, cumulative img/s) lines the Train worker printed, from this Ray session's logs."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    found: list[tuple[int, int]] = []
    for f in sorted(logs.glob("worker-*.out")):
        if f.stat().st_mtime < since:
            continue
        found += [(int(m[1]), int(m[3])) for m in _STEP_LINE.finditer(f.read_text(errors="replace"))]
    return sorted(set(found))


def ray_loop(cfg, data_dir: Path, work: Path, warm_step: int = 50) -> dict:
    """``finetune.run`` on a fresh storage directory (no resume); images/s from its manifest."""
    from synthaug.generative import finetune

    run_dir = work / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.time()
    manifest = finetune.run(cfg, "finetune", data_dir, run_dir / "export", run_dir / "storage")
    wall = time.time() - t0
    b = cfg.finetune.batch_size
    lines = dict(worker_step_lines(t0))
    steady = first_batch = None
    last = cfg.finetune.steps
    if warm_step in lines and last in lines:  # t_N = images_N / (cumulative rate at N)
        t_warm, t_last = warm_step * b / lines[warm_step], last * b / lines[last]
        steady = (last - warm_step) * b / (t_last - t_warm)
        # Time in the loop beyond what the first steps take at the steady rate: the wait for
        # the Ray Data pipeline's first batch (plus first-step warm-up).
        first_batch = t_warm - warm_step * b / steady
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"steps": manifest["steps"], "images": manifest["steps"] * b, "images_per_s": manifest["images_per_s"],
            "steady_images_per_s": steady, "final_loss": manifest["final_loss"],
            "fit_seconds": manifest["train_seconds"], "run_wall_seconds": round(wall, 2),
            "loop_start_overhead_seconds": first_batch, "worker_log_lines": len(lines)}


def data_path(cfg, data_dir: Path) -> dict:
    """Iteration only (no model): the first-batch wait of the stream a Train worker reads.

    Rank 0 of 1's micro-batches for the whole run (``train_data.stream``) through Ray
    Data (``ray_source``: read and decode tasks, one pipeline per epoch), against the
    same stream read and decoded in this process (``local_source``).
    """
    import itertools

    from synthaug.artifacts import read_manifest
    from synthaug.generative import train_data

    t = cfg.finetune
    locations, rows = train_data.shard_locations(str(Path(data_dir).absolute()), read_manifest(data_dir))
    n = t.steps * t.grad_accum

    def run(source, n=n):
        t0, first, count = time.perf_counter(), None, 0
        for _ in itertools.islice(train_data.stream(source, rows, t.seed, 0, 1, t.batch_size, t.shuffle_buffer), n):
            count += 1
            first = first or time.perf_counter() - t0
        return first, time.perf_counter() - t0, count

    _, in_process, _ = run(train_data.local_source(locations))
    # Uncached, every epoch is a Ray Data pipeline of its own: time the first 20 micro-batches only.
    first, total, batches = run(train_data.ray_source(locations), min(n, 20))
    t0 = time.perf_counter()
    cached = train_data.cache(locations)
    cache_s = time.perf_counter() - t0
    first_c, total_c, batches_c = run(train_data.ray_source(locations, cached))
    return {"rows": sum(rows), "shards": len(rows), "micro_batches": batches, "cached_micro_batches": batches_c,
            "micro_batches_per_epoch": train_data.per_epoch(sum(rows), 1, t.batch_size),
            "in_process_decode_seconds": in_process, "ray_first_batch_seconds": first,
            "ray_all_batches_seconds": total, "cache_build_seconds": cache_s,
            "cached_first_batch_seconds": first_c, "cached_all_batches_seconds": total_c}


def cpu_benchmark(args) -> None:
    from synthaug.config import load_config
    from synthaug.raylocal import init_ray

    t_start = time.time()
    dirs = C.digits()
    cfg = load_config(None, [f"finetune.steps={args.steps}", f"finetune.batch_size={args.batch_size}",
                             f"finetune.arch={args.arch}", "finetune.num_workers=1",
                             # 100 rows are one micro-batch an epoch: stream them from the object-store
                             # cache rather than starting a Ray Data pipeline for every step.
                             f"finetune.cache={str(args.cache).lower()}"])
    C.WORK.mkdir(parents=True, exist_ok=True)

    # Ray start-up, timed on its own (it is not part of any throughput).
    t0 = time.time()
    init_ray(cfg.ray)
    ray_init_s = time.time() - t0
    threads = C.ray_worker_threads()

    runs = {}
    for name, fn in (("plain_before", lambda: plain_loop(cfg, dirs["train"])),
                     ("ray", lambda: ray_loop(cfg, dirs["train"], C.WORK)),
                     ("plain_after", lambda: plain_loop(cfg, dirs["train"]))):
        before = C.wait_for_quiet(args.max_load, args.max_wait)
        with C.nice_as(threads["niceness"]) if name.startswith("plain") else C.contextlib.nullcontext():
            r = fn()
        runs[name] = {**r, "load_before": before, "load_after": C.load()}
        print(f"{name}: {json.dumps(runs[name])}", flush=True)

    load_dp = C.load()
    dp = {**data_path(cfg, dirs["train"]), "load_before": load_dp, "load_after": C.load()}
    print(f"data path: {json.dumps(dp)}", flush=True)

    plain_ips = (runs["plain_before"]["images_per_s"] + runs["plain_after"]["images_per_s"]) / 2
    plain_steady = (runs["plain_before"]["steady_images_per_s"] + runs["plain_after"]["steady_images_per_s"]) / 2
    ray = runs["ray"]
    # The same steps on the same data with the same seeds: equal final losses show the plain
    # loop ran the worker's computation, not an easier one.
    same_loss = ray["final_loss"] == runs["plain_before"]["final_loss"] == runs["plain_after"]["final_loss"]
    ratio = ray["images_per_s"] / plain_ips
    ratio_steady = ray["steady_images_per_s"] / plain_steady if ray["steady_images_per_s"] else None
    rows = [
        {"loop": "plain (before)", "img/s": runs["plain_before"]["images_per_s"], "steady img/s": runs["plain_before"]["steady_images_per_s"], "load1 before/after": f"{runs['plain_before']['load_before'][0]}/{runs['plain_before']['load_after'][0]}"},
        {"loop": "plain (after)", "img/s": runs["plain_after"]["images_per_s"], "steady img/s": runs["plain_after"]["steady_images_per_s"], "load1 before/after": f"{runs['plain_after']['load_before'][0]}/{runs['plain_after']['load_after'][0]}"},
        {"loop": "finetune.run (1 worker, a Ray task)", "img/s": ray["images_per_s"], "steady img/s": ray["steady_images_per_s"], "load1 before/after": f"{ray['load_before'][0]}/{ray['load_after'][0]}"},
        {"loop": "ratio ray/plain", "img/s": ratio, "steady img/s": ratio_steady, "load1 before/after": "target >= 0.9"},
    ]
    print()
    print(C.table(rows, ["loop", "img/s", "steady img/s", "load1 before/after"],
                  f"finetune: {args.arch} UNet, 8x8 digits, {args.steps} steps x batch {args.batch_size}, 1 torch thread each"))
    print(f"final loss identical in the Ray and plain loops: {same_loss}")
    print(f"Ray worker loop: {ray['loop_start_overhead_seconds'] or float('nan'):.1f}s before steps ran at the steady rate (waiting for the first batch)")
    print(f"Ray start-up {ray_init_s:.1f}s; Ray finetune.run wall {ray['run_wall_seconds']}s (fit {ray['fit_seconds']}s) "
          f"for {ray['images']} images; total benchmark {time.time() - t_start:.0f}s")
    C.write_result("finetune", {
        "mode": "cpu",
        "settings": {"arch": args.arch, "steps": args.steps, "batch_size": args.batch_size, "data": "digits 8x8, k=10/class 'train' split (100 rows)",
                     "conditioning": "class-conditional, label_dropout 0.1", "plain_torch_threads": 1, "plain_niceness": "set to the Ray workers' (ray_worker_threads.niceness) for the plain runs",
                     "ray_worker_threads": threads, "ray_num_workers": 1, "warm_step": 50, "cache": args.cache},
        "what_is_timed": {
            "images_per_s": "whole loop incl. first step; Ray: the worker's own figure from the export manifest (clock starts on loop entry, so Ray Data first-batch latency is inside; Ray/worker start-up and the final checkpoint are not)",
            "steady_images_per_s": "end of step 50 to last step; Ray: from the worker's cumulative 'step N img/s' log lines",
            "plain": "single process, data decoded in memory beforehand (not timed), torch.set_num_threads(1)",
        },
        "ray_init_seconds": round(ray_init_s, 2),
        "runs": runs,
        "plain_images_per_s_mean": plain_ips,
        "plain_steady_images_per_s_mean": plain_steady,
        "ratio_ray_over_plain": ratio,
        "ratio_ray_over_plain_steady": ratio_steady,
        "same_final_loss_ray_and_plain": same_loss,
        "data_path_only": dp,
        "target_ratio": 0.9,
        "total_wall_seconds": round(time.time() - t_start, 1),
    })


# ----------------------------------------------------------------------------- GPU mode


def gpu_train_step(name: str, batch: int, iters: int, device: str = "cuda", image_px: int = 256,
                   warmup: int = 3, dtype=None, vae: bool = True, checkpointing: bool = False, **overrides) -> dict:
    """Time one bf16-autocast training step of a large random-weight denoiser; FLOPs by torch's counter.

    With ``vae`` the step first encodes a batch of ``image_px`` images through an SD-size VAE
    (no grad), as fine-tuning without a latent cache does; ``denoiser_images_per_s`` times the
    denoiser's step alone. ``checkpointing``: diffusers' gradient checkpointing (the ImageNet
    config's ``finetune.gradient_checkpointing``).
    """
    import torch
    import torch.nn.functional as F

    dtype = dtype or torch.bfloat16
    model, make_inputs = C.build_gpu_model(name, image_px, **overrides)
    model = model.to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    params = sum(p.numel() for p in model.parameters())
    fused = str(device).startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    inputs = make_inputs(batch, device)
    x_key = "hidden_states" if "hidden_states" in inputs else "sample"
    encoder = C.build_gpu_vae().to(device).eval() if vae else None
    images = torch.randn(batch, 3, image_px, image_px, device=device) if vae else None  # (B, 3, H, W)
    target = None

    def denoise_step():
        nonlocal target
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            out = C.gpu_output(model(**inputs))
        if target is None:
            target = torch.randn_like(out, dtype=torch.float32)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        if encoder is not None:
            with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=dtype):
                inputs[x_key] = encoder.encode(images).latent_dist.sample().float() * 0.18215
        denoise_step()

    for _ in range(warmup):
        step()
    flops = C.count_flops(step)  # VAE encode + forward + backward (the optimiser's elementwise work is not counted)
    if fused:
        torch.cuda.reset_peak_memory_stats()
    seconds = C.time_cuda(step, iters, device)
    peak = torch.cuda.max_memory_allocated() if fused else None
    denoise_seconds = C.time_cuda(denoise_step, iters, device) if encoder is not None else seconds
    return {"model": name, "params": params, "batch": batch, "image_px": image_px, "latent": image_px // 8,
            "vae_encode": vae, "gradient_checkpointing": checkpointing,
            "step_seconds": seconds, "images_per_s": batch / seconds, "denoiser_images_per_s": batch / denoise_seconds,
            "flops_per_step": flops, "achieved_flops": flops / seconds, "peak_memory_bytes": peak}


GPU_RUNS = (  # (model, batch per GPU, gradient checkpointing); the ImageNet config: 512 over 8 GPUs, checkpointing
    ("dit-b-2", 64, False), ("dit-xl-2", 64, True), ("sd-unet", 64, True),
)


def gpu_benchmark(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (torch.cuda.is_available() is False); nothing measured")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t_start = time.time()
    name = torch.cuda.get_device_name(0)
    ceiling = C.bf16_matmul_ceiling()
    rows = []
    for model, batch, ckpt in GPU_RUNS:
        r = gpu_train_step(model, batch, args.gpu_iters, checkpointing=ckpt)
        r["mfu"] = r["achieved_flops"] / ceiling
        rows.append(r)
        print(f"  {model}: {r['images_per_s']:.1f} images/s", flush=True)
    print(C.table([{**r, "TFLOP/s": r["achieved_flops"] / 1e12, "peak GiB": r["peak_memory_bytes"] / 2**30} for r in rows],
                  ["model", "params", "batch", "gradient_checkpointing", "images_per_s", "denoiser_images_per_s",
                   "TFLOP/s", "mfu", "peak GiB"],
                  f"train step incl. VAE encode, bf16 autocast, 256 px (latent 32x32x4), {name}; "
                  f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s"))
    C.write_result("finetune_gpu", {
        "mode": "gpu", "device_name": name, "bf16_matmul_ceiling_flops": ceiling,
        "settings": {"precision": "bf16 autocast, fp32 master weights, fused AdamW", "weights": "random",
                     "iters": args.gpu_iters, "flops": "torch.utils.flop_counter (VAE encode + forward + backward)",
                     "data": "random tensors on device (no input pipeline)"},
        "results": rows,
        "gpu_throughput": [C.gpu_record("finetune", r["model"], r["image_px"], r["images_per_s"], name, batch=r["batch"],
                                        gradient_checkpointing=r["gradient_checkpointing"], vae_encode=True) for r in rows],
        "total_wall_seconds": round(time.time() - t_start, 1),
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--arch", default="tiny")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="stream every epoch from Parquet (finetune.cache=false) instead of the object-store cache")
    p.add_argument("--max-load", type=float, default=1.0, help="wait for the 1-min load to drop below this before each run")
    p.add_argument("--max-wait", type=float, default=90.0, help="seconds to wait for --max-load at most")
    p.add_argument("--gpu", action="store_true", help="time DiT-B/2, DiT-XL/2 and SD-UNet bf16 training steps on CUDA (no Ray)")
    p.add_argument("--gpu-iters", type=int, default=20)
    args = p.parse_args()
    gpu_benchmark(args) if args.gpu else cpu_benchmark(args)


if __name__ == "__main__":
    main()
