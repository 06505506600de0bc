"""Scale benchmark: does every stage stay flat in memory and linear in time as N grows?

For each N (default 10k, 40k, 160k images) it writes an image folder of N procedural
RGB JPEGs (``--px`` px, 10 classes; not timed) and runs, on one local Ray:

1. **ingest** of the folder (``synthaug.data.ingest.run``: listing in the driver, decode /
   validate / encode in Ray Data tasks, manifests from per-shard figures);
2. **sample finish** on an N-row synthetic set (completeness, id check, manifest):
   the rows are written as sampling chunks by a Ray Data map over the ingested images
   relabelled as plan rows (a generator would only make them slower to produce; the
   finish is what is measured);
3. **mix** of N real + N synthetic at ratio 1 (the class-balanced, seeded selection,
   read to the end);
4. **one classifier epoch** (``fit``, 1 worker, ``synthaug_cnn_tiny``, the default
   recipe, on the 1:1 mixture of the train split's real rows and as many synthetic ones;
   an epoch is |real train| images in full batches), with its top-1 on the held-out val split and the class
   mix of its batches (``accuracy_by_n``): the image folder is listed class by class, so a
   broken training order shows here as accuracy, not as speed;
5. **feature extraction** of the N-row train set (merged FID statistics).

For each stage it records wall time, images/s (over the images the stage processed:
``work_images`` where that is not N), and the peak memory of the driver and of
the largest other process of the Ray cluster (every descendant of the driver, sampled
every 0.2 s with psutil): private memory (RSS minus shared pages, the targets' measure)
and RSS (which also counts the pages of Ray's shared-memory object store a process has
touched; the store is bounded by its configured size). Each N runs in a fresh driver
process with its own local Ray, after an unrecorded warm-up pass at ``--warmup-n`` that
also trains the one in-domain extractor every N uses. The feature stage caps its
IS/KID/PR subset at ``FEATURE_CAP`` (``evaluate.max_samples``, a documented cap), below
every N. At the two smallest N it also times, in a separate process, a plain
single-process loop doing the same work (what a user would write instead: PIL + pyarrow
in a for loop, pandas for the mix; for the epoch and the features, the library's own
compute cores on the same rows with no Ray: the same mixture rows, steps, augmentation,
optimiser and schedule; every extractor layer, per-class FID sums and the same capped
subset) and prints the ratio and both sides' per-image throughput. The plain loops' torch uses
every core (its default), so the library is given as many: ``classify.cpus_per_worker`` = the
cores, and one feature actor per core. It then measures:

* ``ingest_cpu_scaling``: ingest images/s with a Ray of 2 CPUs over 1 CPU (``--scaling-n``);
* ``stage_overhead_s``: the wall time of stage commands on tiny data when they join a
  running local Ray (``ray.address``), for ``synthaug ingest`` and
  ``synthaug classify classify.epochs=1``.

Summary keys (targets in brackets): ``driver_rss_growth`` (peak driver private memory at
the largest N over the smallest, <= 1.2), ``max_process_rss_growth`` (same for the largest other
process, <= 1.2), ``time_slope`` (log-log slope of wall time in N per stage, max over
stages, <= 1.1), ``ingest_cpu_scaling`` (>= 1.7), ``stage_overhead_s`` (<= 20 per command).

    python benchmarks/scale.py                      # N = 10k, 40k, 160k
    python benchmarks/scale.py --ns 10000 40000 160000 640000
    python benchmarks/scale.py --equal-work 40000   # only the epoch and the features, on the data a run left
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as C
import numpy as np

STAGES = ("ingest", "sample_finish", "mix", "classify_epoch", "features")
CLASSES = 10
FEATURE_CAP = 5000  # evaluate.max_samples for the benchmark's feature stage (below every N)
# The cores the plain loops' torch uses (its default): the library is given as many, as a user on
# one machine would give it (classify.cpus_per_worker; one feature actor per core).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------- data


def _write_images(args) -> int:
    root, start, stop, px, seed = args
    from PIL import Image

    rng = np.random.default_rng([seed, start])
    yy, xx = np.mgrid[0:px, 0:px]
    for i in range(start, stop):
        k = i % CLASSES
        # A class-dependent stripe pattern plus noise: classes are learnable, images differ.
        phase = rng.uniform(0, 2 * np.pi)
        base = 127 + 100 * np.sin((xx * (k + 1) / px) * 2 * np.pi + phase)
        img = np.stack([base, np.roll(base, k, axis=0), base[::-1]], axis=-1) + rng.normal(0, 12, (px, px, 3))
        d = Path(root) / f"class{k:02d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img{i:08d}.jpg", quality=90)
    return stop - start


def image_folder(n: int, px: int, work: Path) -> Path:
    """``work/folder-<n>-<px>/class<k>/img<i>.jpg``: N procedural JPEGs (made once, reused)."""
    from multiprocessing import Pool

    root = work / f"folder-{n}-{px}"
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for k in range(CLASSES):
        (root / f"class{k:02d}").mkdir(parents=True)
    step = 2000
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_images, [(str(root), s, min(n, s + step), px, 0) for s in range(0, n, step)])
    done.write_text(str(n))
    return root


# ----------------------------------------------------------------------------- memory


class RssSampler:
    """Peak memory of this process and of the largest other process under it, sampled in a thread.

    Two figures per process: RSS, and private memory (RSS minus shared pages). Every Ray
    process maps the node's shared-memory object store, and the store's pages a process
    has touched count in its RSS although the store (bounded by its configured size) owns
    them; private memory is what the process itself holds. Targets apply to private memory.
    """

    def __init__(self, interval: float = 0.2):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.driver_peak = self.driver_private_peak = 0
        self.other_peak = self.other_private_peak = 0
        self.other_name = ""
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        m = self.me.memory_info()
        self.driver_peak = max(self.driver_peak, m.rss)
        self.driver_private_peak = max(self.driver_private_peak, m.rss - m.shared)
        for p in self.me.children(recursive=True):
            try:
                m = p.memory_info()
                self.other_peak = max(self.other_peak, m.rss)
                if m.rss - m.shared > self.other_private_peak:
                    self.other_private_peak, self.other_name = m.rss - m.shared, " ".join(p.cmdline()[:3])[:80]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


def measure(stage: str, n: int, fn, *args, **kwargs) -> tuple[dict, object]:
    """Run ``fn`` under an RSS sampler; the row for the table and ``fn``'s result."""
    import gc

    gc.collect()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        out = fn(*args, **kwargs)
    wall = time.perf_counter() - t0
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    row = {"stage": stage, "n": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1),
           "driver_mb": mb(rss.driver_private_peak), "max_other_mb": mb(rss.other_private_peak),
           "driver_rss_mb": mb(rss.driver_peak), "max_other_rss_mb": mb(rss.other_peak),
           "max_other_process": rss.other_name}
    print(f"  {stage:15s} N={n:>7d}  {wall:8.1f} s  {n / wall:9.1f} img/s  driver {row['driver_mb']:7.1f} MB "
          f"(RSS {row['driver_rss_mb']:7.1f})  other {row['max_other_mb']:7.1f} MB (RSS {row['max_other_rss_mb']:7.1f})",
          flush=True)
    return row, out


def per_image(row: dict, images: int) -> dict:
    """A stage's throughput over the images it actually processed (``work_images``), not over N."""
    return {"work_images": int(images), "images_per_s": round(images / max(row["wall_s"], 1e-9), 1)}


# ----------------------------------------------------------------------------- summary


def slope(ns: list[int], ts: list[float]) -> float:
    """Least-squares slope of log(t) on log(n)."""
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(ts, float))
    return float(np.polyfit(x, y, 1)[0]) if len(ns) >= 2 else float("nan")


def summarise(rows: list[dict]) -> dict:
    ns = sorted({r["n"] for r in rows})
    lo, hi = ns[0], ns[-1]
    by = {(r["stage"], r["n"]): r for r in rows}
    per_stage = {}
    for s in STAGES:
        pts = [(n, by[(s, n)]["wall_s"]) for n in ns if (s, n) in by]
        if len(pts) >= 2:
            per_stage[s] = round(slope([p[0] for p in pts], [p[1] for p in pts]), 3)
    def peak(key, n):
        return max(r[key] for r in rows if r["n"] == n)

    drv, oth = [peak("driver_mb", n) for n in (lo, hi)], [peak("max_other_mb", n) for n in (lo, hi)]
    drv_rss, oth_rss = [peak("driver_rss_mb", n) for n in (lo, hi)], [peak("max_other_rss_mb", n) for n in (lo, hi)]
    return {
        "driver_rss_growth": round(drv[1] / drv[0], 3),
        "max_process_rss_growth": round(oth[1] / oth[0], 3),
        "time_slope": max(per_stage.values()) if per_stage else float("nan"),
        "time_slope_per_stage": per_stage,
        "memory_measure": "private memory (RSS - shared) per process; RSS beside it",
        "driver_private_mb": dict(zip(("smallest_n", "largest_n"), drv)),
        "max_process_private_mb": dict(zip(("smallest_n", "largest_n"), oth)),
        "driver_rss_mb": dict(zip(("smallest_n", "largest_n"), drv_rss)),
        "max_process_rss_mb": dict(zip(("smallest_n", "largest_n"), oth_rss)),
        "driver_rss_growth_including_shared": round(drv_rss[1] / drv_rss[0], 3),
        "max_process_rss_growth_including_shared": round(oth_rss[1] / oth_rss[0], 3),
    }


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in STAGES:
        pts = sorted((r["n"], r["wall_s"], r["driver_mb"]) for r in rows if r["stage"] == s)
        if not pts:
            continue
        n, t, m = zip(*pts)
        axes[0].loglog(n, t, "o-", label=s)
        axes[1].semilogx(n, m, "o-", label=s)
    ns = sorted({r["n"] for r in rows})
    if ns:
        t0 = min(r["wall_s"] for r in rows if r["n"] == ns[0])
        axes[0].loglog(ns, [t0 * n / ns[0] for n in ns], "k--", lw=0.8, label="slope 1")
    axes[0].set(xlabel="N images", ylabel="wall time (s)", title="time per stage (log-log)")
    axes[1].set(xlabel="N images", ylabel="driver peak private memory (MB)", title="driver memory (RSS - shared)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- plain single-process baselines


def plain_ingest(folder: Path, out: Path, px: int, val_fraction: float = 0.3, seed: int = 0) -> dict:
    """What a user writes instead: PIL in a for loop, a seeded split, one Parquet file per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from synthaug.data.images import encode_png

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    rows = {"id": [], "image": [], "label": [], "class_name": []}
    for k, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            im = Image.open(f).convert("RGB")
            if im.size != (px, px):
                im = im.resize((px, px), Image.Resampling.BICUBIC)
            rows["id"].append(f"{c}/{f.name}")
            rows["image"].append(encode_png(np.asarray(im)))
            rows["label"].append(k)
            rows["class_name"].append(c)
    n = len(rows["id"])
    val = np.random.default_rng(seed).random(n) < val_fraction
    table = pa.table({**rows, "label": pa.array(rows["label"], pa.int64()), "source": ["real"] * n})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.filter(pa.array(~val)), out / "train.parquet")
    pq.write_table(table.filter(pa.array(val)), out / "val.parquet")
    return {"train": int((~val).sum()), "val": int(val.sum())}


def plain_finish(parquet_dir: Path, expected: int) -> dict:
    """Read the sampled shards, check completeness, drop duplicate ids, count and hash."""
    import pyarrow.parquet as pq

    from synthaug.artifacts import table_content_hash

    table = pq.read_table(parquet_dir)
    ids = table.column("id").to_pylist()
    _, first = np.unique(np.asarray(ids, dtype=object), return_index=True)
    if len(first) != len(ids):
        table = table.take(np.sort(first))
    if table.num_rows != expected:
        raise RuntimeError(f"{table.num_rows} rows, expected {expected}")
    labels = np.asarray(table.column("label"))
    return {"rows": table.num_rows, "counts": np.bincount(labels).tolist(), "hash": table_content_hash(table)}


def plain_mix(real_file: Path, syn_dir: Path, seed: int = 0) -> int:
    """pandas: every real row plus, per class, as many synthetic rows drawn without replacement."""
    import pandas as pd

    real = pd.read_parquet(real_file)
    syn = pd.read_parquet(syn_dir)
    parts = [real]
    for label, n in real["label"].value_counts().sort_index().items():
        parts.append(syn[syn["label"] == label].sample(n=int(n), random_state=seed))
    mixed = pd.concat(parts)
    return int(sum(len(b) for b in mixed["image"]))  # touch every image


def _read_shards(loc: str, columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthaug.artifacts import shard_paths

    return pa.concat_tables([pq.read_table(p, columns=columns) for p in shard_paths(loc)])


def plain_epoch(real: str, syn: str, classify, px: int, seed: int = 0) -> dict:
    """The library's classifier epoch in a plain loop: the same rows, the same steps, the same compute.

    Rows: the 1:1 mixture ``fit`` trains on -- every real train row plus, per class, as many
    synthetic rows with the smallest mixture keys (``mixing.keys``: the rows the library keeps).
    Steps: one epoch of |real| images (``classify.epoch_images = 0``), ``ceil(|real| / batch_size)``
    batches drawn from a seeded shuffle of the mixture, decoded per batch, augmented per image by
    the library's ``TrainCollate`` and trained by ``core.train_epoch`` with the recipe's optimiser,
    schedule and loss -- only the data path (Ray Data streaming) differs.
    """
    import math

    import pyarrow as pa

    from synthaug.artifacts import id_hashes
    from synthaug.classify.augment import TrainCollate
    from synthaug.classify.core import build_loss, build_optimizer, build_scheduler, train_epoch
    from synthaug.classify.mixing import keys, per_class_counts
    from synthaug.classify.models import build_classifier
    from synthaug.data.images import decode_batch

    cols = ["id", "image", "label", "source"]
    real_t, syn_t = _read_shards(real, cols), _read_shards(syn, cols)
    real_labels = np.asarray(real_t.column("label"))
    syn_labels = np.asarray(syn_t.column("label"))
    u = keys(syn_t.column("id"), syn_t.column("label"), seed)
    kept = np.concatenate([np.flatnonzero(syn_labels == c)[np.argsort(u[syn_labels == c], kind="stable")[:n]]
                           for c, n in per_class_counts(real_labels, 1.0).items()])
    mixture = pa.concat_tables([real_t, syn_t.take(pa.array(np.sort(kept)))])
    steps = max(1, math.ceil(len(real_t) / classify.batch_size))
    order = np.random.default_rng(seed).permutation(len(mixture))[:steps * classify.batch_size]
    collate = TrainCollate(classify, 3, (px, px), seed, 0)

    def batches():
        for i in range(steps):
            t = mixture.take(pa.array(order[i * classify.batch_size:(i + 1) * classify.batch_size]))
            ids = t.column("id").to_numpy(zero_copy_only=False)
            yield collate({"image": decode_batch(t.column("image").to_pylist()), "label": np.asarray(t.column("label")),
                           "domain": np.asarray(t.column("source").to_pylist()) == "synthetic", "key": id_hashes(ids)})

    model = build_classifier(classify, CLASSES, 3, seed)
    optimizer = build_optimizer(model, classify)
    scheduler = build_scheduler(optimizer, classify, steps)
    scheduler.step_update(num_updates=0)  # as the library's loop starts a schedule
    stats = train_epoch(model, batches(), optimizer, scheduler, build_loss(classify), "cpu", seed=seed)
    return {"images": stats["images"], "steps": stats["step"], "mixture_rows": len(mixture)}


def plain_features(train: str, extractor_dir: str, cap: int = FEATURE_CAP, seed: int = 0) -> dict:
    """What ``dataset_statistics`` computes, in a plain loop over the train shards: every extractor layer
    per image, per-class ``(n, sum, sum of outer products)`` of the FID layer in float64, and the
    capped, class-balanced, seeded subset's features of every layer (the same rows the library picks)."""
    import pyarrow.parquet as pq

    from synthaug.artifacts import read_manifest, shard_paths
    from synthaug.evaluate.extractors import build_extractor, decode_images, extract_batch, resolve_extractor
    from synthaug.evaluate.features import subset_keys, subset_quotas

    ex = resolve_extractor("in-domain", extractor_dir)
    layers = sorted(set(ex.layers.values()))
    fe = build_extractor(ex, layers, "cpu")
    m = read_manifest(train)
    labels_all = np.asarray(_read_shards(train, ["label"]).column("label"))
    ids_all = _read_shards(train, ["id"]).column("id").to_pylist()
    quotas = subset_quotas(np.bincount(labels_all, minlength=CLASSES).tolist(), cap)
    k = subset_keys(ids_all, seed)
    chosen = set()
    for c, q in enumerate(quotas):
        rows = np.flatnonzero(labels_all == c)
        chosen.update(ids_all[j] for j in rows[np.argsort(k[rows], kind="stable")[:q]])
    n, sums, outer, subset = np.zeros(CLASSES, np.int64), None, None, {name: [] for name in layers}
    for path in shard_paths(train):
        for b in pq.ParquetFile(path).iter_batches(batch_size=256, columns=["id", "image", "label"]):
            ids, lab = b.column(0).to_pylist(), np.asarray(b.column(2))
            feats = extract_batch(fe, decode_images(b.column(1).to_pylist(), ids, m["image_size"], train), "cpu")
            f = feats[ex.layers["fid"]].astype(np.float64)  # (B, D)
            if sums is None:
                sums, outer = np.zeros((CLASSES, f.shape[1])), np.zeros((CLASSES, f.shape[1], f.shape[1]))
            for c in np.unique(lab):
                fc = f[lab == c]
                n[c], sums[c], outer[c] = n[c] + len(fc), sums[c] + fc.sum(0), outer[c] + fc.T @ fc
            sel = np.fromiter((i in chosen for i in ids), bool, len(ids))
            for name in layers:
                subset[name].append(feats[name][sel])
    return {"rows": int(n.sum()), "subset_rows": int(sum(len(x) for x in subset[layers[0]]))}


# ----------------------------------------------------------------------------- the library's stages


def _cfg(work: Path, folder: Path | None, px: int, per_class: int, extra: list[str] = ()):
    from synthaug.config import load_config

    over = [f"work_dir={work}", "ingest.source=imagefolder", f"ingest.path={folder}", "ingest.mode=RGB",
            f"ingest.image_size={px}", "ingest.k_per_class=0", f"sample.per_class={per_class}",
            "sample.chunk_size=1000", "classify.model=synthaug_cnn_tiny", "classify.epochs=1", "classify.seeds=[0]",
            "classify.cache=false", f"classify.cpus_per_worker={CORES}", *extra]
    return load_config(None, over)


def _synthetic_chunk(chunks: dict, out: str, write_id: str, px: int, counts: dict, names: list, seed: int) -> dict:
    """Ray Data task: plan rows of each chunk with procedural images, written as the sampler writes them."""
    import pyarrow as pa

    from synthaug.artifacts import write_shard
    from synthaug.data.images import encode_png
    from synthaug.generative import sample

    entries = []
    for j, total in zip(chunks["index"], chunks["total"]):
        chunk = sample.Chunk(int(j), int(total))
        plan = sample.chunk_plan(chunk, counts, names, seed)
        rng = np.random.default_rng([int(j), 1])
        imgs = [encode_png(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(plan.num_rows)]
        n = plan.num_rows
        table = pa.table({"id": plan.column("id"), "image": pa.array(imgs, pa.binary()), "label": plan.column("label"),
                          "class_name": plan.column("class_name"), "source": pa.array(["synthetic"] * n),
                          "generator": pa.array(["bench"] * n), "seed": plan.column("seed"),
                          "guidance_scale": pa.array([1.0] * n), "sampler": pa.array(["none"] * n),
                          "steps": pa.array([0] * n, pa.int64())})
        entries.append(json.dumps(write_shard(out, write_id, chunk.name, table, names)))
    return {"entry": np.asarray(entries, dtype=object)}


def make_synthetic(cfg, out: str, px: int) -> list[dict]:
    """An unfinished sampled set of N rows at ``out`` (plan + shards), as the sampling actors leave it."""
    import pyarrow as pa
    import ray.data

    from synthaug.generative import sample

    names = [f"class{k:02d}" for k in range(CLASSES)]
    gen = {"weights_hash": "bench-procedural", "class_names": names, "image_size": px, "channels": 3}
    key = sample.sample_key(gen, cfg.sample)
    plan = sample._new_plan(out, key, gen, "procedural", cfg.sample)
    chunks = sample.plan_chunks(plan["counts"], names, plan["chunk_size"])
    table = pa.table({"index": [c.index for c in chunks], "total": [c.total for c in chunks]})
    ds = ray.data.from_arrow(table).repartition(len(chunks)).map_batches(
        _synthetic_chunk, fn_kwargs={"out": out, "write_id": plan["write_id"], "px": px, "counts": plan["counts"],
                                     "names": names, "seed": cfg.sample.seed}, batch_size=1, batch_format="numpy")
    return [json.loads(r["entry"]) for r in ds.iter_rows()]


def _consume(ds) -> int:
    return sum(len(b["label"]) for b in ds.iter_batches(batch_size=4096, batch_format="numpy"))


def library_stages(n: int, folder: Path, work: Path, px: int, extractor: str | None) -> tuple[list[dict], str]:
    """The five stages for one N; returns the rows and the extractor location (trained once, untimed)."""
    from synthaug import storage
    from synthaug.artifacts import read_manifest
    from synthaug.classify.mixing import mixture_dataset, plan_mixture
    from synthaug.classify.train import fit
    from synthaug.data import ingest
    from synthaug.generative import sample

    shutil.rmtree(work, ignore_errors=True)
    cfg = _cfg(work, folder, px, n // CLASSES)
    data = storage.join(str(work), "data")
    rows = []
    r, _ = measure("ingest", n, ingest.run, cfg, data)
    rows.append(r)

    syn = storage.join(str(work), "samples", "bench")
    entries = make_synthetic(cfg, syn, px)
    r, _ = measure("sample_finish", n, sample.finish, cfg, syn, None, entries)
    rows.append(r)
    del entries

    train, val = storage.join(data, "train"), storage.join(data, "val")
    r, _ = measure("mix", n, lambda: _consume(mixture_dataset(plan_mixture(train, syn, 1.0, 0))))
    rows.append(r)

    m = read_manifest(train)
    if extractor is None:  # one in-domain extractor for every N (untimed): 1 epoch on this N's train set
        fit(cfg.classify, train, val, seed=0, out_dir=str(work.parent / "extractor"), name="extractor",
            class_names=m["class_names"], in_chans=3, ray_cfg=cfg.ray, save_model=True)
        extractor = str(work.parent / "extractor" / "model")
    return rows + library_epoch_features(n, cfg, work, extractor), extractor


def library_epoch_features(n: int, cfg, work: Path, extractor: str) -> list[dict]:
    """The classifier epoch and the features of N's train split (``work/data``) and synthetic set, timed."""
    from synthaug import storage
    from synthaug.artifacts import read_manifest
    from synthaug.classify.mixing import plan_mixture
    from synthaug.classify.train import fit
    from synthaug.evaluate.features import dataset_statistics

    data, syn = storage.join(str(work), "data"), storage.join(str(work), "samples", "bench")
    train, val = storage.join(data, "train"), storage.join(data, "val")
    m = read_manifest(train)
    shutil.rmtree(work / "clf", ignore_errors=True)  # runs are keyed: a kept one would time a cache hit
    spec = plan_mixture(train, syn, 1.0, 0)
    r, res = measure("classify_epoch", n, fit, cfg.classify, spec, val, seed=0, out_dir=storage.join(str(work), "clf"),
                     name="epoch", class_names=m["class_names"], in_chans=3, ray_cfg=cfg.ray)
    # What the epoch learnt, so a throughput figure can never hide a broken training order: top-1
    # on the held-out val split of the procedural classes, and the class mix of its batches.
    r.update({k: res[k] for k in ("top1", "batch_blocked_share", "batch_label_entropy", "threads")})
    # An epoch is |real| images (classify.epoch_images = 0) in full batches from the 2 |real| mixture.
    r.update(per_image(r, math.ceil(m["num_rows"] / cfg.classify.batch_size) * cfg.classify.batch_size))
    print(f"  classify_epoch N={n:>7d}  top-1 {res['top1']:.2f} on val, blocked batches {res['batch_blocked_share']:.3f}",
          flush=True)
    rows = [r]
    # IS/KID/PR hold a capped subset (evaluate.max_samples, a documented cap): set below the
    # smallest N, so what grows with N is only what is not capped. One actor per core, as the plain
    # loop's torch uses every core (each actor's torch takes its one CPU: bit-identical features).
    r, _ = measure("features", n, dataset_statistics, train, extractor, batch_size=256, max_samples=FEATURE_CAP,
                   min_actors=CORES, max_actors=CORES)
    rows.append({**r, **per_image(r, m["num_rows"])})
    return rows


def plain_stages(n: int, folder: Path, work: Path, px: int, extractor: str, only=None) -> list[dict]:
    """What a user would write instead, one process, on the same data (the syn set is the library's).

    The classifier epoch and the features read the library's train split and synthetic set, so
    they do the library's work on the same rows (ingest's own split differs in which rows, not how many).
    """
    from synthaug.artifacts import read_manifest

    syn = work / "samples" / "bench"
    syn_shards = syn / "data" / read_manifest(str(syn))["shards"][0]["path"].split("/")[1]
    train = str(work / "data" / "train")
    out = work / "plain"
    classify = _cfg(work, folder, px, n // CLASSES).classify
    stages = (
        ("ingest", plain_ingest, (folder, out, px)),
        ("sample_finish", plain_finish, (syn_shards, n // CLASSES * CLASSES)),
        ("mix", plain_mix, (out / "train.parquet", syn_shards)),
        ("classify_epoch", plain_epoch, (train, str(syn), classify, px)),
        ("features", plain_features, (train, extractor)),
    )
    rows = []
    for stage, fn, args in (s for s in stages if only is None or s[0] in only):
        r, out_ = measure(stage, n, fn, *args)
        work_images = {"classify_epoch": lambda: out_["images"], "features": lambda: out_["rows"]}.get(stage)
        rows.append({**r, "side": "plain", **(per_image(r, work_images()) if work_images else {})})
    return rows


# ----------------------------------------------------------------------------- CPU scaling and fixed cost


def ingest_only(n: int, px: int, num_cpus: int) -> dict:
    """Ingest N images on a local Ray of ``num_cpus`` logical CPUs (in its own process); images/s."""
    from synthaug.data import ingest
    from synthaug.raylocal import init_ray

    folder = image_folder(n, px, C.WORK / "scale")
    work = C.WORK / "scale" / f"cpus-{num_cpus}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = _cfg(work, folder, px, 1, [f"ray.num_cpus={num_cpus}"])
    init_ray(cfg.ray)
    ingest.run(_cfg(work / "warm", image_folder(2000, px, C.WORK / "scale"), px, 1), str(work / "warm-data"))
    t0 = time.perf_counter()
    ingest.run(cfg, str(work / "data"))
    wall = time.perf_counter() - t0
    return {"num_cpus": num_cpus, "n": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1)}


def _in_subprocess(args: list[str], tag: str, what: str, timeout: int = 3600):
    """Run this script with ``args`` in a fresh process; echo its indented progress lines and return the
    JSON it printed after ``tag``."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag + " ")]
    print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("  ")), flush=True)
    if proc.returncode or not line:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len(tag) + 1:])


def library_subprocess(n: int, px: int, extractor: str, tag: str) -> tuple[list[dict], str]:
    """The library's five stages for one N in a fresh driver process (it starts its own local Ray)."""
    out = _in_subprocess(["--library-only", str(n), "--px", str(px), "--extractor", extractor, "--tag", tag], "LIBRARY",
                         f"library stages at N={n}", timeout=7200)
    return out["rows"], out["extractor"]


def plain_subprocess(n: int, px: int, extractor: str) -> list[dict]:
    """The plain baselines for one N in a fresh process (so their tables never count in the driver's RSS)."""
    return _in_subprocess(["--plain-only", str(n), "--px", str(px), "--extractor", extractor], "PLAIN",
                          f"plain baselines at N={n}")


def cpu_scaling(n: int, px: int) -> dict:
    runs = []
    for cpus in (1, 2):
        runs.append(_in_subprocess(["--ingest-only", str(n), "--px", str(px), "--num-cpus", str(cpus)], "INGEST",
                                   f"ingest-only with {cpus} CPUs"))
        print(f"  ingest on {cpus} CPU(s): {runs[-1]['images_per_s']} img/s", flush=True)
    return {"runs": runs, "ratio": round(runs[1]["images_per_s"] / runs[0]["images_per_s"], 3)}


def stage_overhead(work: Path) -> dict:
    """Wall time of stage commands on the tiny config when they join a running local Ray head."""
    sys.path.insert(0, str(C.ROOT / "tests"))
    import raycli as R

    from synthaug.config import RayConfig

    # A fresh work dir: outputs are found by content key, so a kept one would time a cache hit.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    head = R.start_head(work / "head.log", num_cpus=RayConfig().num_cpus)
    out = {}
    try:
        env = R.cli_env()
        base = [str(Path(sys.executable).with_name("synthaug"))]
        tiny = ["--config", "jobs/configs/tiny.yaml", f"ray.address={head.address}", f"work_dir={work / 'runs'}",
                f"results_dir={work / 'results'}"]
        for name, cmd in (("ingest", ["ingest", *tiny]),
                          ("classify (1 epoch)", ["classify", *tiny, "classify.epochs=1", "--ratio", "0"])):
            t0 = time.perf_counter()
            proc = subprocess.run(base + cmd, cwd=C.ROOT, env=env, capture_output=True, text=True, timeout=900)
            out[name] = round(time.perf_counter() - t0, 1)
            if proc.returncode:
                raise RuntimeError(f"synthaug {' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            print(f"  synthaug {name}: {out[name]} s (joining a running Ray)", flush=True)
    finally:
        R.stop(head)
    return out


def equal_work(n: int, px: int, side: str | None) -> None:
    """``--equal-work N``: the two stages the equal-work targets are about, on the data and extractor a
    full run left at N (``runs/bench/scale/n<N>``), each side in a fresh process; prints and writes the ratios."""
    work, extractor = C.WORK / "scale" / f"n{n}", str(C.WORK / "scale" / "extractor" / "model")
    folder = C.WORK / "scale" / f"folder-{n}-{px}"
    if side == "library":
        from synthaug.raylocal import init_ray

        cfg = _cfg(work, folder, px, n // CLASSES)
        init_ray(cfg.ray)
        print("ROWS " + json.dumps(library_epoch_features(n, cfg, work, extractor)), flush=True)
        return
    if side == "plain":
        print("ROWS " + json.dumps(plain_stages(n, folder, work, px, extractor, ("classify_epoch", "features"))), flush=True)
        return
    if not (work / "data" / "train" / "manifest.json").exists() or not Path(extractor).exists():
        raise SystemExit(f"--equal-work {n}: no data at {work} or no extractor; run `python benchmarks/scale.py --ns {n}` first")
    load_before, sides = C.load(), {}
    for s in ("library", "plain"):
        sides[s] = _in_subprocess(["--equal-work", str(n), "--px", str(px), "--side", s], "ROWS", f"{s} at N={n}")
    ratios = [{"stage": lib["stage"], "n": n, "images": lib["work_images"], "library_s": lib["wall_s"],
               "plain_s": p["wall_s"], "library_img_s": lib["images_per_s"], "plain_img_s": p["images_per_s"],
               "plain_over_library": round(p["wall_s"] / lib["wall_s"], 3)}
              for lib, p in zip(sides["library"], sides["plain"]) if lib["work_images"] == p["work_images"]]
    if len(ratios) != 2:
        raise RuntimeError(f"unequal work: {sides}")
    print(C.table(ratios, ["stage", "n", "images", "library_s", "plain_s", "library_img_s", "plain_img_s",
                           "plain_over_library"], f"equal work at N={n}, {CORES} cores (>1: the library is faster)"))
    C.write_result("scale_equal_work", {"n": n, "px": px, "cores": CORES, "targets": {"classify_epoch": ">= 0.9",
                   "features": ">= 0.9"}, "plain_vs_library": ratios, "rows": sides["library"],
                   "plain_rows": sides["plain"], "load_before": load_before, "load_after": C.load()})


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    ap.add_argument("--px", type=int, default=32)
    ap.add_argument("--plain-ns", type=int, default=2, help="plain baselines at this many smallest N")
    ap.add_argument("--scaling-n", type=int, default=40_000)
    ap.add_argument("--ingest-only", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--num-cpus", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--plain-only", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--library-only", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    ap.add_argument("--extractor", default="", help=argparse.SUPPRESS)
    ap.add_argument("--warmup-n", type=int, default=1000, help="an unrecorded first pass (imports, first Ray workers)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["scaling", "overhead", "plain"])
    ap.add_argument("--equal-work", type=int, default=0, metavar="N",
                    help="only the classifier epoch and the features, library vs plain, at an N a full run left data "
                         "for; writes results/bench/scale_equal_work.json")
    ap.add_argument("--side", choices=["library", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--overhead-only", action="store_true",
                    help="measure only the stage overhead and update it in results/bench/scale.json")
    args = ap.parse_args()
    if args.overhead_only:
        path = C.RESULTS / "scale.json"
        doc = json.loads(path.read_text())
        overhead = stage_overhead(C.WORK / "scale" / "overhead")
        doc.update(stage_overhead=overhead, stage_overhead_s=max(overhead.values()),
                   stage_overhead_measured={"command": C.command(), "code": C.code_version(), "load_before": C.load(),
                                            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        doc["summary"]["stage_overhead_s"] = doc["stage_overhead_s"]
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"stage_overhead_s {doc['stage_overhead_s']} {overhead}; updated {path}")
        return
    if args.equal_work:
        return equal_work(args.equal_work, args.px, args.side)
    if args.ingest_only:
        print("INGEST " + json.dumps(ingest_only(args.ingest_only, args.px, args.num_cpus)), flush=True)
        return
    if args.library_only:
        from synthaug.raylocal import init_ray

        init_ray()
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        n = args.library_only
        rows, extractor = library_stages(n, image_folder(n, args.px, C.WORK / "scale"), C.WORK / "scale" / args.tag,
                                         args.px, args.extractor or None)
        print("LIBRARY " + json.dumps({"rows": rows, "extractor": extractor}), flush=True)
        return
    if args.plain_only:
        n = args.plain_only
        rows = plain_stages(n, image_folder(n, args.px, C.WORK / "scale"), C.WORK / "scale" / f"n{n}", args.px,
                            args.extractor)
        print("PLAIN " + json.dumps(rows), flush=True)
        return

    load_before = C.load()
    # Each N runs in a fresh driver process with its own local Ray, so no memory is carried between Ns.
    rows, plain, extractor = [], [], ""
    if args.warmup_n:
        print(f"warm-up, N = {args.warmup_n} (not recorded; trains the extractor every N uses)", flush=True)
        _, extractor = library_subprocess(args.warmup_n, args.px, "", "warmup")
    for i, n in enumerate(sorted(args.ns)):
        image_folder(n, args.px, C.WORK / "scale")
        print(f"N = {n}", flush=True)
        lib_rows, extractor = library_subprocess(n, args.px, extractor, f"n{n}")
        rows += lib_rows
        if i < args.plain_ns and "plain" not in args.skip:
            plain += plain_subprocess(n, args.px, extractor)
    ratios = []
    for p in plain:
        lib = next(r for r in rows if r["stage"] == p["stage"] and r["n"] == p["n"])
        if p.get("work_images", p["n"]) != lib.get("work_images", lib["n"]):
            raise RuntimeError(f"{p['stage']} at N={p['n']}: the plain loop processed {p.get('work_images')} images, "
                               f"the library {lib.get('work_images')}; the comparison would not be of equal work")
        ratios.append({"stage": p["stage"], "n": p["n"], "images": lib.get("work_images", lib["n"]),
                       "library_s": lib["wall_s"], "plain_s": p["wall_s"], "library_img_s": lib["images_per_s"],
                       "plain_img_s": p["images_per_s"], "plain_over_library": round(p["wall_s"] / lib["wall_s"], 3)})
    summary = summarise(rows)
    summary["ingest_cpu_scaling"] = cpu_scaling(args.scaling_n, args.px)["ratio"] if "scaling" not in args.skip else None
    overhead = stage_overhead(C.WORK / "scale" / "overhead") if "overhead" not in args.skip else {}
    summary["stage_overhead_s"] = max(overhead.values()) if overhead else None
    targets = {"driver_rss_growth": "<= 1.2", "max_process_rss_growth": "<= 1.2", "time_slope": "<= 1.1",
               "ingest_cpu_scaling": ">= 1.7", "stage_overhead_s": "<= 20"}
    print(C.table(rows, ["stage", "n", "wall_s", "images_per_s", "driver_mb", "max_other_mb", "driver_rss_mb",
                         "max_other_rss_mb"], "library stages (memory: private MB, and RSS incl. shared object-store pages)"))
    if ratios:
        print(C.table(ratios, ["stage", "n", "images", "library_s", "plain_s", "library_img_s", "plain_img_s",
                               "plain_over_library"],
                      "plain single-process loop vs the library (same work; >1: the library is faster)"))
    print(C.table([{"figure": k, "value": summary[k], "target": t} for k, t in targets.items()], ["figure", "value", "target"]))
    accuracy = [{"n": r["n"], "top1": r["top1"], "batch_blocked_share": r["batch_blocked_share"],
                 "batch_label_entropy": r["batch_label_entropy"]} for r in rows if r["stage"] == "classify_epoch"]
    print(C.table(accuracy, ["n", "top1", "batch_blocked_share", "batch_label_entropy"],
                  "classifier epoch: top-1 on the held-out val split, and the class mix of its batches"))
    plot(rows, C.RESULTS / "scale.png")
    C.write_result("scale", {
        **{k: summary[k] for k in targets}, "targets": targets, "summary": summary, "stage_overhead": overhead,
        "settings": {"ns": sorted(args.ns), "px": args.px, "classes": CLASSES, "scaling_n": args.scaling_n},
        "accuracy_by_n": accuracy, "rows": rows, "plain_rows": plain, "plain_vs_library": ratios, "load_before": load_before,
        "load_after": C.load(), "plot": "results/bench/scale.png"})


if __name__ == "__main__":
    main()
