"""Classifier training throughput: Ray Train + Ray Data vs a plain PyTorch DataLoader loop.

CPU mode (default): ``synthaug.classify.train.fit`` (Ray Train, 1 worker; the train set
decoded once and materialised (``classify.cache``, as the digits configs set it;
the plain loop also holds decoded images, so both sides do the same work) -- or, with
``--no-cache``, its Parquet shards streamed and decoded by Ray Data each epoch -- read with
``iter_torch_batches``, augmented by ``TrainCollate`` in Ray Data's prefetch thread) against a plain loop that feeds the same
``train_epoch`` core from a ``torch.utils.data.DataLoader`` over the same decoded images
with the same collate (shuffled, ``num_workers=0``: augmentation in the loop's thread).
Same model, optimiser, schedule, augmentation, batch size, steps per epoch and epochs;
one torch thread each
(the Ray worker sets ``torch.set_num_threads(1)``; the plain loop does the same).

Numbers per side, per epoch: ``images_per_s`` = images / seconds inside ``train_epoch``
(for Ray: the figure the worker reports each epoch, collected on the controller by a
``ray.train.UserCallback``). Each epoch's clock starts before its first batch, so the
per-epoch iterator start (Ray Data's ``iter_torch_batches``, the DataLoader's iterator) is
inside; validation, checkpointing and Ray start-up are not. The ratio uses the median
over epochs after the first. ``fit`` wall time (Ray start-up excluded, Ray Train
start-up, decoding, checkpoints included) is reported beside it.

To split the gap, a third run feeds the plain loop from a ``streaming_split(1)`` shard
of the same Ray Dataset, iterated exactly as the worker does (Ray Data without Ray
Train), and an iteration-only pass (no model) times each data path per epoch.

GPU mode (``--gpu``, CUDA only, no Ray): timm ``resnet50`` training at 224 and 256 px, and
feature extraction (resnet50 at 256 px; Inception-v3 on 256 px images resized to 299 as
torch-fidelity does), bf16 autocast, channels_last, random data: images/s, device name, peak
memory; ``gpu_throughput`` entries for ``synthaug estimate``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import _common as C


def make_cfg(args):
    from synthaug.config import ClassifyConfig

    return ClassifyConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, seeds=(0,), num_workers=1,
                          cache=args.cache)


# ----------------------------------------------------------------------------- plain loop


def plain_loop(cfg, train_dir: Path, val_dir: Path, seed: int = 0, source: str = "dataloader") -> dict:
    """``train_epoch`` in this process; same model, optimiser and schedule as the worker.

    ``source="dataloader"`` feeds it from a DataLoader over the decoded train set (the
    plain baseline); ``"ray_shard"`` from a ``streaming_split(1)`` shard of the Ray Dataset
    ``fit`` builds, read through the worker's ``iterate`` with its batch, shuffle and collate settings
    -- Ray Data without Ray Train, to split the gap between the two.
    """
    import math

    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from synthaug.artifacts import read_manifest, read_table
    from synthaug.classify.augment import MixupCutmix, TrainCollate, _seed, enabled
    from synthaug.classify.mixing import real_only
    from synthaug.classify.models import build_classifier
    from synthaug.classify.train import (array_batches, build_loss, build_optimizer, build_scheduler, decode_to_uint8,
                                         evaluate, iterate, train_epoch, training_dataset)
    from synthaug.data.images import decode_batch, to_float

    torch.set_num_threads(1)  # as the Ray worker
    m = read_manifest(train_dir)
    table = read_table(train_dir, columns=["id", "image", "label", "source"])  # bounded: the digits benchmark set
    dec = decode_to_uint8(table)  # the same uint8 arrays the Ray Dataset streams
    rows = [{k: dec[k][i] for k in dec} for i in range(table.num_rows)]
    val = read_table(val_dir, columns=["image", "label"])
    val_x, val_y = to_float(decode_batch(val.column("image").to_pylist())), np.asarray(val.column("label"))
    shard = (training_dataset(real_only(str(train_dir)), seed=seed, cache=cfg.cache).streaming_split(1, equal=True)[0]
             if source == "ray_shard" else None)
    image_size = dec["image"].shape[2:]

    num_classes = len(m["class_names"])
    model = build_classifier(cfg, num_classes, m["channels"], seed)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scheduler.step_update(num_updates=0)
    loss_fn = build_loss(cfg)
    mixup = MixupCutmix(cfg, num_classes) if enabled(cfg) else None

    epochs, t_run, step = [], time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(_seed(seed, epoch, 0, 1))
        if shard is None:  # decoding and augmentation in the loop's own thread, as a plain DataLoader(num_workers=0)
            collate = TrainCollate(cfg, m["channels"], image_size, seed, epoch)
            loader = DataLoader(rows, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                                collate_fn=lambda b, c=collate: c({k: np.stack([r[k] for r in b]) for k in b[0]}),
                                generator=torch.Generator().manual_seed(_seed(seed, epoch, 0, 3)))
            batches = iter(loader)
        else:  # the worker's iteration, verbatim
            batches = iterate(shard, steps_per_epoch, cfg, batch_size=cfg.batch_size, seed=seed, epoch=epoch, rank=0,
                              in_chans=m["channels"], image_size=image_size)
        stats = train_epoch(model, batches, optimizer, scheduler, loss_fn, "cpu", step=step, seed=_seed(seed, 0),
                            mixup=mixup)
        step = stats["step"]
        top1 = evaluate(model, array_batches(val_x, val_y), num_classes=num_classes)["top1"]
        epochs.append({"epoch": epoch + 1, "images": stats["images"], "train_seconds": stats["seconds"],
                       "images_per_s": stats["images"] / stats["seconds"], "epoch_seconds": time.perf_counter() - t0,
                       "top1": top1})
    return {"epochs": epochs, "run_seconds": time.perf_counter() - t_run, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- Ray loop


def _callback(path: Path):
    """A Train V2 callback (runs on the controller) appending every report to a JSON-lines file."""
    from ray.train import UserCallback

    class ToFile(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps(metrics[0], default=str) + "\n")

    return ToFile()


def ray_loop(cfg, train_dir: Path, val_dir: Path, work: Path) -> dict:
    """``fit`` on a fresh storage directory; per-epoch images/s from the worker's reports."""
    from synthaug.artifacts import read_manifest
    from synthaug.classify.train import fit

    run_dir = work / f"classifier-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    reports = run_dir / "reports.jsonl"
    m = read_manifest(train_dir)
    t0 = time.time()
    final = fit(cfg, str(train_dir), str(val_dir), seed=0, out_dir=run_dir, name="bench",
                class_names=m["class_names"], in_chans=m["channels"], callbacks=[_callback(reports)])
    wall = time.time() - t0
    per_epoch = [json.loads(line) for line in reports.read_text().splitlines()]
    epochs = [{"epoch": r["epoch"], "images_per_s": r["images_per_s"], "top1": r["top1"]} for r in per_epoch]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"epochs": epochs, "fit_wall_seconds": round(wall, 2), "train_plus_eval_seconds": final["seconds"],
            "final_top1": final["top1"]}


def data_path(cfg, train_dir: Path, epochs: int = 10) -> dict:
    """Iteration only (no model), ms per epoch: where the Ray side's extra time per epoch goes.

    The same decoded uint8 rows and the same ``TrainCollate`` (decoding-side work plus the
    configured augmentation) through (a) a DataLoader in this thread, (b) the materialised
    Ray Dataset that ``fit`` builds (``training_dataset``), iterated directly, and (c) a
    ``streaming_split(1)`` shard of it -- what a Ray Train worker's ``get_dataset_shard``
    returns -- read through the loop's ``iterate``.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from synthaug.artifacts import read_manifest, read_table
    from synthaug.classify.augment import TrainCollate
    from synthaug.classify.mixing import real_only
    from synthaug.classify.train import decode_to_uint8, iterate, training_dataset

    torch.set_num_threads(1)
    c = read_manifest(train_dir)["channels"]
    table = read_table(train_dir, columns=["id", "image", "label", "source"])  # bounded: the digits benchmark set
    steps = math.ceil(table.num_rows / cfg.batch_size)
    dec = decode_to_uint8(table)
    rows = [{k: dec[k][i] for k in dec} for i in range(table.num_rows)]
    size = dec["image"].shape[2:]
    ds = training_dataset(real_only(str(train_dir)), seed=0, cache=cfg.cache)
    shard = ds.streaming_split(1, equal=True)[0]

    def loader(e):
        collate = TrainCollate(cfg, c, size, 0, e)
        return DataLoader(rows, batch_size=cfg.batch_size, shuffle=True,
                          collate_fn=lambda b: collate({k: np.stack([r[k] for r in b]) for k in b[0]}))

    def per_epoch(make) -> dict:
        times = []
        for e in range(epochs):
            t0 = time.perf_counter()
            for _ in make(e):
                pass
            times.append(1000 * (time.perf_counter() - t0))
        return {"median_ms": statistics.median(times[1:]), "first_ms": times[0]}

    it = dict(batch_size=cfg.batch_size, seed=0, rank=0, in_chans=c, image_size=size)
    return {
        "batches_per_epoch": steps,
        "augment": cfg.augment,
        "cache": cfg.cache,
        "dataloader": per_epoch(loader),
        "ray_dataset_iterate": per_epoch(lambda e: iterate(ds, steps, cfg, epoch=e, **it)),
        "streaming_split_shard_iterate_as_worker": per_epoch(lambda e: iterate(shard, steps, cfg, epoch=e, **it)),
    }


def _median_after_first(epochs: list[dict]) -> float:
    return statistics.median(e["images_per_s"] for e in epochs[1:])


def cpu_benchmark(args) -> None:
    from synthaug.raylocal import init_ray

    t_start = time.time()
    dirs = C.digits()
    cfg = make_cfg(args)
    t0 = time.time()
    init_ray()
    ray_init_s = time.time() - t0
    threads = C.ray_worker_threads()

    runs = {}
    for name, fn in (("plain_before", lambda: plain_loop(cfg, dirs["train_full"], dirs["val"])),
                     ("ray", lambda: ray_loop(cfg, dirs["train_full"], dirs["val"], C.WORK)),
                     ("plain_ray_shard", lambda: plain_loop(cfg, dirs["train_full"], dirs["val"], source="ray_shard")),
                     ("plain_after", lambda: plain_loop(cfg, dirs["train_full"], dirs["val"]))):
        before = C.wait_for_quiet(args.max_load, args.max_wait)
        with C.nice_as(threads["niceness"]) if name.startswith("plain") else C.contextlib.nullcontext():
            r = fn()
        r.update(load_before=before, load_after=C.load(), median_images_per_s=_median_after_first(r["epochs"]),
                 first_epoch_images_per_s=r["epochs"][0]["images_per_s"])
        runs[name] = r
        print(f"{name}: median {r['median_images_per_s']:.0f} img/s, first epoch {r['first_epoch_images_per_s']:.0f}, "
              f"load {before} -> {r['load_after']}", flush=True)

    load_dp = C.load()
    dp = data_path(cfg, dirs["train_full"])
    dp["load_before"], dp["load_after"] = load_dp, C.load()

    plain = (runs["plain_before"]["median_images_per_s"] + runs["plain_after"]["median_images_per_s"]) / 2
    ray = runs["ray"]["median_images_per_s"]
    # Per-epoch seconds implied by the medians (images per epoch are the same on both sides).
    n_epoch = runs["plain_before"]["epochs"][0]["images"]
    epoch_ms = {"plain": 1000 * n_epoch / plain, "plain_ray_shard": 1000 * n_epoch / runs["plain_ray_shard"]["median_images_per_s"],
                "ray": 1000 * n_epoch / ray}
    ratio = ray / plain
    ratio_shard = runs["plain_ray_shard"]["median_images_per_s"] / plain
    rows = [{"loop": label, "median img/s": runs[k]["median_images_per_s"],
             "epoch-1 img/s": runs[k]["first_epoch_images_per_s"],
             "load1 before/after": f"{runs[k]['load_before'][0]}/{runs[k]['load_after'][0]}"}
            for k, label in (("plain_before", "plain DataLoader (before)"), ("plain_after", "plain DataLoader (after)"),
                             ("plain_ray_shard", "plain loop on a Ray Data shard"),
                             ("ray", "Ray Train + Ray Data (1 worker)"))]
    rows.append({"loop": "ratio Ray Data shard/plain", "median img/s": ratio_shard, "epoch-1 img/s": None, "load1 before/after": ""})
    rows.append({"loop": "ratio ray/plain", "median img/s": ratio, "epoch-1 img/s": None, "load1 before/after": "target >= 0.9"})
    print()
    print(C.table(rows, ["loop", "median img/s", "epoch-1 img/s", "load1 before/after"],
                  f"classifier: {cfg.model}, digits train_full ({runs['plain_before']['epochs'][0]['images']} images/epoch), "
                  f"batch {cfg.batch_size}, {cfg.epochs} epochs, 1 torch thread each"))
    print(f"per epoch: plain {epoch_ms['plain']:.0f} ms, plain on a Ray Data shard {epoch_ms['plain_ray_shard']:.0f} ms, "
          f"Ray Train {epoch_ms['ray']:.0f} ms (+{epoch_ms['ray'] - epoch_ms['plain']:.0f} ms)")
    print(C.table([{"path": k, "median ms/epoch": v["median_ms"], "first ms": v["first_ms"]} for k, v in dp.items() if isinstance(v, dict) and "median_ms" in v],
                  ["path", "median ms/epoch", "first ms"], f"data path only (no model), {dp['batches_per_epoch']} batches/epoch"))
    print(f"Ray start-up {ray_init_s:.1f}s; fit wall {runs['ray']['fit_wall_seconds']}s; plain run "
          f"{runs['plain_after']['run_seconds']:.1f}s; total benchmark {time.time() - t_start:.0f}s")
    C.write_result("classifier", {
        "mode": "cpu",
        "settings": {"model": cfg.model, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "augment": cfg.augment,
                     "data": "digits 8x8 'train_full' split, " + ("decoded once (classify.cache)" if cfg.cache else "streamed from Parquet and decoded each epoch"), "plain_loader": "DataLoader(TensorDataset, shuffle=True, num_workers=0)",
                     "plain_torch_threads": 1, "plain_niceness": "set to the Ray workers' (ray_worker_threads.niceness) for the plain runs", "ray_worker_threads": threads, "ray_num_workers": 1},
        "what_is_timed": "per epoch: images / seconds inside train_epoch (iterator start included; validation, checkpoints, start-up excluded); ratio of medians over epochs 2..N",
        "ray_init_seconds": round(ray_init_s, 2),
        "runs": runs,
        "plain_median_images_per_s_mean": plain,
        "ray_median_images_per_s": ray,
        "ratio_ray_over_plain": ratio,
        "ratio_ray_data_shard_over_plain": ratio_shard,
        "epoch_ms_from_medians": epoch_ms,
        "data_path_only": dp,
        "target_ratio": 0.9,
        "total_wall_seconds": round(time.time() - t_start, 1),
    })


# ----------------------------------------------------------------------------- GPU mode


def gpu_resnet50(batch: int, iters: int, device: str = "cuda", image_px: int = 224, model_name: str = "resnet50",
                 warmup: int = 5) -> dict:
    """Training images/s of a random-weight timm model: bf16 autocast, channels_last, SGD."""
    import timm
    import torch
    import torch.nn.functional as F

    model = timm.create_model(model_name, pretrained=False, num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, image_px, image_px, device=device).to(memory_format=torch.channels_last)  # (B, 3, H, W)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = C.time_cuda(step, iters, device)
    return {"model": model_name, "batch": batch, "image_px": image_px, "step_seconds": seconds,
            "images_per_s": batch / seconds, "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def gpu_features(model_name: str, batch: int, iters: int, device: str = "cuda", image_px: int = 256,
                 input_px: int | None = None, warmup: int = 3) -> dict:
    """Feature-extraction images/s of a random-weight timm model: bf16 autocast inference, channels_last.

    ``input_px``: the network's input size when it differs from the images' (Inception-v3 takes
    299 px, as torch-fidelity's FID extractor resizes to); the bilinear resize is timed too.
    """
    import timm
    import torch
    import torch.nn.functional as F

    model = timm.create_model(model_name, pretrained=False, num_classes=0).to(device)
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.rand(batch, 3, image_px, image_px, device=device)  # (B, 3, H, W)

    @torch.inference_mode()
    def step():
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            y = F.interpolate(x, size=(input_px, input_px), mode="bilinear", align_corners=False) if input_px else x
            return model(y.contiguous(memory_format=torch.channels_last))

    for _ in range(warmup):
        step()
    seconds = C.time_cuda(step, iters, device)
    return {"model": model_name, "batch": batch, "image_px": image_px, "input_px": input_px or image_px,
            "step_seconds": seconds, "images_per_s": batch / seconds}


def gpu_benchmark(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (torch.cuda.is_available() is False); nothing measured")
    torch.backends.cudnn.benchmark = True
    t_start = time.time()
    name = torch.cuda.get_device_name(0)
    train = [gpu_resnet50(args.gpu_batch, args.gpu_iters, image_px=px) for px in (224, 256)]
    for r in train:
        print(f"  resnet50 train {r['image_px']} px: {r['images_per_s']:.1f} images/s", flush=True)
    feats = [gpu_features("resnet50", 500, args.gpu_iters, image_px=256),
             gpu_features("inception_v3", 500, args.gpu_iters, image_px=256, input_px=299)]
    print(C.table([{**r, "peak GiB": r["peak_memory_bytes"] / 2**30} for r in train],
                  ["model", "batch", "image_px", "images_per_s", "peak GiB"],
                  f"timm resnet50 training, bf16 autocast, channels_last, {name}"))
    print(C.table(feats, ["model", "batch", "image_px", "input_px", "images_per_s"],
                  f"feature extraction (inference), bf16 autocast, channels_last, {name}"))
    records = [C.gpu_record("classifier", r["model"], r["image_px"], r["images_per_s"], name, batch=r["batch"]) for r in train]
    records += [C.gpu_record("features", "inception-v3" if r["model"] == "inception_v3" else r["model"], r["image_px"],
                             r["images_per_s"], name, batch=r["batch"], input_px=r["input_px"]) for r in feats]
    C.write_result("classifier_gpu", {
        "mode": "gpu", "device_name": name,
        "settings": {"precision": "bf16 autocast", "memory_format": "channels_last", "optimizer": "SGD momentum",
                     "data": "random tensors on device (no input pipeline, no augmentation)", "iters": args.gpu_iters},
        "results": train, "features": feats, "gpu_throughput": records,
        "total_wall_seconds": round(time.time() - t_start, 1),
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="synthaug_cnn_tiny")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-load", type=float, default=1.0, help="wait for the 1-min load to drop below this before each run")
    p.add_argument("--max-wait", type=float, default=90.0, help="seconds to wait for --max-load at most")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="stream and decode the Parquet shards each epoch (the plain loop still holds decoded "
                        "tensors: unequal work, a measure of the decode cost only)")
    p.add_argument("--gpu", action="store_true", help="timm resnet50 at 224, bf16 + channels_last, on CUDA (no Ray)")
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--gpu-iters", type=int, default=30)
    args = p.parse_args()
    gpu_benchmark(args) if args.gpu else cpu_benchmark(args)


if __name__ == "__main__":
    main()
