"""Class-balanced sampling with classifier-free guidance through a Ray Data actor pool.

The plan is never materialised in the driver. It is a list of ``J = ceil(N / chunk_size)``
*chunks* (``sample.chunk_size`` images, default ``sample.batch_size``): O(N / chunk) small
rows. Chunk j holds a proportional slice of every class (:class:`Chunk`), laid out in a
seeded order, so every shard mixes the classes (a trainer's shuffle buffer never meets a
one-class shard). Each image's seed derives from
(global seed, class, index), so an image is the same whatever the pool size, chunk or
batch size, or retries. :class:`ChunkSampler` (a :class:`Sampler` that loads the
exported generator once per actor) turns a chunk row into its plan rows, samples them
and writes them itself as one shard with a deterministic name, returning only the
shard's small manifest entry; the images never pass through the driver.

Layout of a set (at any location, ``s3://`` included)::

    <out>/plan.json                                 {sample_key, write_id, chunk_size, chunks, ...}; while unfinished
    <out>/data/<write id>/chunk-<jjjjjjj>.parquet   one shard per chunk j: a proportional slice of every class
    <out>/manifest.json                             written last: the commit; plan.json is then removed

Image-to-image (``sample.init: real``, SDEdit as in DA-Fusion): sample i of class c
starts from a real image of class c noised to ``sample.strength``. The sources are the
class's rows of a real contract dataset (``sample.source``, by default the run's train
split) in an order seeded by (seed, id), and sample i takes position i mod n_c: a
function of (seed, label, i) and the real set's content alone, so each real image gets
the same number of variants (up to one) and nothing depends on pool size or chunking.
The driver holds only the (label, id, shard) index of the real set (one small row per
real image; :mod:`synthaug.generative.sources`); each chunk reads its own sources' rows
from their shards. Rows record the source's id (``source_id``) and the ``strength``.

Output locations are keyed by a content hash of the generator and the settings that
change pixels (with init 'real': the strength and the real set's content hash), so a
different config never reuses another's output. A re-run of an
interrupted set lists its write id's shards, keeps every planned shard whose Parquet
footer has the planned row count, and samples only the other chunks.
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from synthaug import storage, tracking
from synthaug.artifacts import (BASE_COLUMNS, DATA_DIR, MANIFEST, PROVENANCE_COLUMNS, DatasetError, commit_dataset,
                                hash_obj, new_write_id, read_manifest, shard_stats, write_shard)
from synthaug.config import Config, SampleConfig, to_dict
from synthaug.data.images import decode_batch, encode_png, from_float, to_float
from synthaug.generative import models
from synthaug.generative.diffusion import sample_images
from synthaug.generative.sources import check_source, read_sources, resolve_source, source_index, source_rows
from synthaug.keys import VERSION as KEYS_VERSION
from synthaug.keys import row_keys

PIXEL_KEYS = ("guidance_scale", "sampler", "steps", "ddpm_log_variance_v", "seed")  # settings that change images
PLAN = "plan.json"
COLUMNS = [*BASE_COLUMNS, *PROVENANCE_COLUMNS]
IMG2IMG_COLUMNS = ("source_id", "strength")  # provenance of image-to-image rows (init 'real')
CHECK_GROUP = 256  # shard footers read per Ray task when resuming
MAX_BLOCKS = 4096  # chunk rows are spread over at most this many blocks (one chunk per block below it)


# ----------------------------------------------------------------------------- the plan


def sample_seeds(global_seed: int, label: int, indices) -> np.ndarray:
    """63-bit seeds of class ``label``'s images ``indices``, from (global seed, class, index), never from rank or batch."""
    return row_keys([f"{int(label)}/{int(i)}" for i in indices], global_seed, "sample") >> np.uint64(1)


def sample_seed(global_seed: int, label: int, index: int) -> int:
    """The 63-bit seed of one image (:func:`sample_seeds`)."""
    return int(sample_seeds(global_seed, label, [index])[0])


def class_counts(s: SampleConfig, class_names: list[str]) -> dict[str, int]:
    """Per-class image counts, checked against the generator's classes."""
    if not s.class_counts:
        return {c: s.per_class for c in class_names}
    unknown = [c for c in s.class_counts if c not in class_names]
    if unknown:
        raise DatasetError(f"config key 'sample.class_counts': class {unknown[0]!r} is not in the generator's manifest ({class_names})")
    return {c: int(n) for c, n in s.class_counts.items()}


class Chunk(NamedTuple):
    """Shard ``index`` of ``total`` (J): of the k-th of K classes, with n images, the images
    ``[floor((j n + o) / J), floor(((j + 1) n + o) / J))`` where ``o = floor(k J / K)``. The
    offsets stagger the classes' cuts, so every chunk holds about N / J images, with the
    classes in proportion (a class with fewer images than chunks appears in every
    J / n-th). One actor call, one shard."""

    index: int
    total: int

    @property
    def name(self) -> str:
        return chunk_name(self.index)

    def parts(self, counts: dict[str, int], class_names: list[str]) -> list[tuple[int, str, int, int]]:
        """``(label, class name, start, stop)`` of each class with images in this chunk."""
        j, t, kk = self.index, self.total, len(counts)
        out = []
        for k, (name, n) in enumerate(counts.items()):
            o = k * t // kk
            a, b = (j * int(n) + o) // t, ((j + 1) * int(n) + o) // t
            if b > a:
                out.append((class_names.index(name), name, a, b))
        return out

    def rows(self, counts: dict[str, int]) -> int:
        return sum(b - a for _, _, a, b in self.parts(counts, list(counts)))


def chunk_name(index: int) -> str:
    return f"chunk-{int(index):07d}"


def shard_rel(write_id: str, name: str) -> str:
    """A chunk's shard path relative to the set (as manifests list it)."""
    return f"{DATA_DIR}/{write_id}/{name}.parquet"


def chunk_size(s: SampleConfig) -> int:
    return int(s.chunk_size or s.batch_size)


def plan_chunks(counts: dict[str, int], class_names: list[str], size: int) -> list[Chunk]:
    """The plan as ``ceil(N / size)`` chunks, each a proportional slice of every class (so every shard mixes them).

    O(N / size) small rows; a chunk's images are a function of (counts, its index, the
    chunk count) and each image's seed of (seed, class, index), never of the layout.
    """
    total = sum(int(n) for n in counts.values())
    k = -(-total // max(1, int(size))) if total else 0
    return [Chunk(j, k) for j in range(k)]


def plan_rows(label: int, class_name: str, start: int, stop: int, global_seed: int) -> pa.Table:
    """The plan rows ``(id, label, class_name, index, seed)`` of one class's images ``[start, stop)``."""
    idx = range(int(start), int(stop))
    n = len(idx)
    return pa.table({
        "id": pa.array([f"syn-c{int(label):04d}-{i:07d}" for i in idx], pa.string()),
        "label": pa.array([int(label)] * n, pa.int64()),
        "class_name": pa.array([str(class_name)] * n, pa.string()),
        "index": pa.array(list(idx), pa.int64()),
        "seed": pa.array(sample_seeds(global_seed, label, idx).astype(np.int64), pa.int64()),
    })


def chunk_plan(chunk: Chunk, counts: dict[str, int], class_names: list[str], global_seed: int, rows=plan_rows) -> pa.Table:
    """A chunk's plan rows, its classes interleaved in the writers' seeded order (``shuffle.layout_order``).

    ``rows(label, class_name, start, stop, seed)`` makes one class's part (image-to-image adds its sources).
    """
    from synthaug.shuffle import layout_order

    t = pa.concat_tables([rows(*part, global_seed) for part in chunk.parts(counts, class_names)])
    return t.take(pa.array(layout_order(t.column("id").to_pylist(), global_seed)))


def plan_table(s: SampleConfig, class_names: list[str]) -> pa.Table:
    """The whole plan as one table: for bounded uses only (tests, benchmarks' plain loops)."""
    counts = class_counts(s, class_names)
    chunks = plan_chunks(counts, class_names, chunk_size(s))
    return pa.concat_tables([chunk_plan(c, counts, class_names, s.seed) for c in chunks])


def columns(s: SampleConfig) -> list[str]:
    """The columns of a sampled set's rows."""
    return [*COLUMNS, *IMG2IMG_COLUMNS] if s.init == "real" else list(COLUMNS)


def sample_key(gen_manifest: dict, s: SampleConfig, source_hash: str | None = None) -> str:
    """Content key of a sampled set: generator weights + the settings that change pixels + plan.

    With ``s.init == 'real'``, ``source_hash`` (the real set's ``content_hash``) is required.
    """
    settings = {k: getattr(s, k) for k in PIXEL_KEYS}
    if s.compile:  # compiled kernels round differently (floats differ in the last bits), so never share a set;
        settings["compile"] = True  # added only when on, so keys of uncompiled sets stay as they were
    if s.init == "real":  # likewise added only for image-to-image, so text-to-image keys stay as they were
        if not source_hash:
            raise ValueError("sample_key: init 'real' needs the real set's content hash")
        settings.update(init="real", strength=float(s.strength), source=str(source_hash))
    counts = class_counts(s, gen_manifest["class_names"])
    return hash_obj({"generator": gen_manifest["weights_hash"], "sample": settings, "counts": counts,
                     "keys": KEYS_VERSION})[:16]


def default_out_dir(cfg: Config, key: str) -> str:
    return storage.join(cfg.work_dir, "samples", key)


# ----------------------------------------------------------------------------- the actors


def _local_generator(generator_dir: str, weights_hash: str | None) -> str:
    """A local directory with the generator export (object stores: a cached copy keyed by its weights)."""
    if storage.is_uri(generator_dir) and weights_hash is None:
        weights_hash = read_manifest(generator_dir)["weights_hash"]
    return str(storage.localize(generator_dir, key=weights_hash))


class Sampler:
    """Loads the generator once, maps plan batches to contract rows (PNG bytes + provenance).

    On a GPU the denoiser runs under bf16 autocast (fp16 where the GPU has no bf16) in
    channels_last, with diffusers' SDPA attention (its default processor) and, through
    ``sample_images``, in ``torch.inference_mode``; ``sample.compile`` adds ``torch.compile``
    (``compile_backend``: torch's default, or e.g. 'eager' to test the wiring cheaply).
    """

    def __init__(self, generator_dir: str, sample: dict, device: str | None = None, compile_backend: str = "inductor",
                 weights_hash: str | None = None):
        self.s = SampleConfig(**{k: v for k, v in sample.items()})
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.gen = models.load_generator(_local_generator(str(generator_dir), weights_hash), require_manifest=True)
        self.gen.to(self.device).model.eval()
        cuda = self.device.type == "cuda"
        if cuda:
            for part in (self.gen.model, self.gen.components.get("vae")):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        if self.s.compile:  # compiled lazily, on the first batch (and again per new batch shape)
            self.gen.model = torch.compile(self.gen.model, backend=compile_backend)
        self.gen_id = self.gen.manifest["weights_hash"][:16]
        self.autocast = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None

    def sample_batch(self, batch: dict) -> pa.Table:
        """Plan rows (``id``, ``label``, ``class_name``, ``seed``; image-to-image also ``source_id`` and
        ``source_image``, PNG bytes) -> contract rows."""
        labels = [int(v) for v in batch["label"]]
        seeds = [int(v) for v in batch["seed"]]
        init = None
        if "source_image" in batch:  # image-to-image: the sources as pixels in [-1, 1]
            init = torch.from_numpy(to_float(decode_batch(list(batch["source_image"]), batch["source_id"])))  # (B, C, H, W)
        x = sample_images(self.gen, labels, seeds, guidance_scale=self.s.guidance_scale, sampler=self.s.sampler,
                          steps=self.s.steps, ddpm_log_variance_v=self.s.ddpm_log_variance_v,
                          device=self.device, autocast_dtype=self.autocast, init=init, strength=self.s.strength)
        imgs = from_float(x.float().cpu()).transpose(0, 2, 3, 1)  # (B, H, W, C) uint8
        n = len(labels)
        img2img = {} if init is None else {
            "source_id": pa.array([str(v) for v in batch["source_id"]], pa.string()),
            "strength": pa.array([float(self.s.strength)] * n, pa.float64()),
        }
        return pa.table({
            "id": pa.array([str(v) for v in batch["id"]], pa.string()),
            "image": pa.array([encode_png(im) for im in imgs], pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "class_name": pa.array([str(v) for v in batch["class_name"]], pa.string()),
            "source": pa.array(["synthetic"] * n, pa.string()),
            "generator": pa.array([self.gen_id] * n, pa.string()),
            "seed": pa.array(seeds, pa.int64()),
            "guidance_scale": pa.array([float(self.s.guidance_scale)] * n, pa.float64()),
            "sampler": pa.array([self.s.sampler] * n, pa.string()),
            "steps": pa.array([int(self.s.steps)] * n, pa.int64()),
            **img2img,
        })

    __call__ = sample_batch


class ChunkSampler(Sampler):
    """Ray Data actor: chunk rows in; each chunk sampled in batches and written as its shard; entries out.

    The write is a side effect, but an idempotent one: a chunk's shard has a fixed name
    and bytes that depend only on the chunk, and ``write_shard`` replaces it atomically,
    so a retried call (a restarted actor) rewrites the same file and never adds rows.
    """

    def __init__(self, generator_dir: str, sample: dict, out: str, write_id: str, class_names: list[str],
                 counts: dict[str, int], weights_hash: str | None = None, device: str | None = None,
                 compile_backend: str = "inductor", source: str | None = None, source_index: pa.Table | None = None):
        super().__init__(generator_dir, sample, device, compile_backend, weights_hash)
        self.out, self.write_id, self.class_names, self.counts = out, write_id, list(class_names), dict(counts)
        self.source_fs = storage.resolve(source)[0] if source else None
        self.source_index = source_index  # (label, id, shard) of the real set: image-to-image only

    def _rows(self, label: int, class_name: str, start: int, stop: int, seed: int) -> pa.Table:
        """One class's plan rows; image-to-image adds each row's source (id and PNG bytes, read from its shard)."""
        plan = plan_rows(label, class_name, start, stop, seed)
        if self.source_index is None:
            return plan
        ids, shards = source_rows(self.source_index, label, start, stop)
        pngs = read_sources(self.source_fs, ids, shards)
        return plan.append_column("source_id", pa.array(ids, pa.string())).append_column(
            "source_image", pa.array(pngs, pa.binary()))

    def __call__(self, chunks: dict) -> dict:
        entries = []
        for j, total in zip(chunks["index"], chunks["total"]):
            chunk = Chunk(int(j), int(total))
            plan = chunk_plan(chunk, self.counts, self.class_names, self.s.seed, rows=self._rows)
            bs = self.s.batch_size
            parts = [self.sample_batch(plan.slice(i, bs).to_pydict()) for i in range(0, plan.num_rows, bs)]
            entry = write_shard(self.out, self.write_id, chunk.name, pa.concat_tables(parts), self.class_names)
            entries.append(json.dumps(entry))
        return {"entry": np.asarray(entries, dtype=object)}


# ----------------------------------------------------------------------------- plan file and shards


def read_plan(out: str) -> dict | None:
    """The ``plan.json`` of an unfinished set, or None."""
    loc = storage.join(out, PLAN)
    if not storage.is_file(loc):
        return None
    try:
        return storage.read_json(loc)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{loc}: unreadable plan file ({e}); delete the directory to start over") from None


def _new_plan(out: str, key: str, gen_manifest: dict, generator_dir: str, s: SampleConfig,
              source: dict | None = None) -> dict:
    counts = class_counts(s, gen_manifest["class_names"])
    size = chunk_size(s)
    plan = {"sample_key": key, "write_id": new_write_id(), "chunk_size": size,
            "chunks": len(plan_chunks(counts, gen_manifest["class_names"], size)), "num_rows": sum(counts.values()),
            "counts": counts, "class_names": gen_manifest["class_names"], "image_size": gen_manifest["image_size"],
            "channels": gen_manifest["channels"], "generator": generator_dir,
            "generator_weights_hash": gen_manifest["weights_hash"], **(source or {})}
    storage.write_json(storage.join(out, PLAN), plan)
    return plan


def _footer_rows(fs, paths: list[str]) -> list[int]:
    """Row counts from the Parquet footers of some shards (-1: missing, truncated or unreadable)."""
    rows = []
    for p in paths:
        try:
            rows.append(int(pq.read_metadata(p, filesystem=fs).num_rows))
        except Exception:  # noqa: BLE001 - any unreadable shard is redone
            rows.append(-1)
    return rows


def done_chunks(out: str, plan: dict, chunks: list[Chunk]) -> list[Chunk]:
    """Planned chunks whose shard exists with the planned row count (footers read by Ray tasks).

    Shards that are present but unreadable or of the wrong size are deleted (to be redone);
    files that are not planned shards are never read.
    """
    import ray

    present = {posixpath.basename(i.path): i.path for i in storage.list_files(storage.join(out, DATA_DIR, plan["write_id"]))}
    found = [(c, present[c.name + ".parquet"]) for c in chunks if c.name + ".parquet" in present]
    if not found:
        return []
    fs, _ = storage.resolve(out)
    task = ray.remote(_footer_rows).options(num_cpus=0.5)
    groups = [found[i:i + CHECK_GROUP] for i in range(0, len(found), CHECK_GROUP)]
    rows = ray.get([task.remote(fs, [p for _, p in g]) for g in groups])
    done = []
    for g, r in zip(groups, rows):
        for (c, p), n in zip(g, r):
            if n == c.rows(plan["counts"]):
                done.append(c)
            else:
                print(f"[sample] {shard_rel(plan['write_id'], c.name)}: {'unreadable' if n < 0 else f'{n} rows'}, "
                      f"planned {c.rows(plan['counts'])}; sampling it again", flush=True)
                fs.delete_file(p)
    return done


class _Interner:
    """Shares equal ``counts`` lists between entries: the driver holds O(chunks) entries, each
    with a per-class list (1,000 ints for ImageNet) that is the same for most chunks."""

    def __init__(self):
        self.seen: dict[tuple, list] = {}

    def __call__(self, entry: dict) -> dict:
        counts = tuple(entry["counts"])
        entry["counts"] = self.seen.setdefault(counts, list(counts))
        return entry


# ----------------------------------------------------------------------------- driver


def _sample_chunks(cfg: Config, generator_dir: str, gen_manifest: dict, out: str, plan: dict,
                   todo: list[Chunk], intern: _Interner, source: str | None = None) -> list[dict]:
    """Stream the chunk rows through samplers (an actor pool, or pooled tasks for a small set); returns
    the written shards' entries."""
    import ray.data

    from synthaug.raylocal import map_pool_kwargs

    s = cfg.sample
    img2img = {} if source is None else {"source": source, "source_index": source_index(source, s.seed)}
    ds = ray.data.from_items([c._asdict() for c in todo], override_num_blocks=min(len(todo), MAX_BLOCKS))
    ds = ds.map_batches(
        batch_size=1, batch_format="numpy",
        **map_pool_kwargs(
            ChunkSampler, {"generator_dir": generator_dir, "sample": to_dict(s), "out": out,
                           "write_id": plan["write_id"], "class_names": list(gen_manifest["class_names"]),
                           "counts": plan["counts"], "weights_hash": gen_manifest["weights_hash"], **img2img},
            rows=sum(c.rows(plan["counts"]) for c in todo), min_size=s.min_actors, max_size=s.max_actors,
            num_gpus=s.num_gpus_per_actor),
    )
    return [intern(json.loads(row["entry"])) for row in ds.iter_rows()]


def _refuse_other(out: str, found: str | None, key: str) -> None:
    if found != key:
        raise DatasetError(f"{out}: holds a different sampling config's data (key {found} != {key}); "
                           f"choose another output directory")


def run(cfg: Config, generator_dir: str, out_dir: str | None = None, *, source_dir: str | None = None,
        stop_after_rows: int | None = None) -> tuple[str, dict]:
    """Sample ``cfg.sample`` from an exported generator; returns (dataset location, manifest).

    ``source_dir``: with ``sample.init: real``, the real contract dataset the sources come
    from (default ``sample.source``). ``stop_after_rows`` samples only about that many more
    rows (whole chunks) and leaves the set unfinished (as an interrupted run would); the
    next call completes it.
    """
    from synthaug.raylocal import init_ray

    s = cfg.sample
    # Check everything before any sampling or writing.
    generator_dir = storage.absolute(str(generator_dir))
    if not storage.is_file(storage.join(generator_dir, MANIFEST)):
        raise models.GeneratorError(f"{generator_dir}: no manifest.json, so this is not a finished generator export")
    gen_manifest = read_manifest(generator_dir)
    class_names = gen_manifest["class_names"]
    source = resolve_source(s, source_dir)
    source_info = None
    if source is not None:
        src_m = check_source(source, gen_manifest, class_counts(s, class_names))
        source_info = {"init": "real", "source": source, "source_content_hash": src_m["content_hash"]}
    key = sample_key(gen_manifest, s, source_info and source_info["source_content_hash"])
    out = storage.absolute(str(out_dir)) if out_dir else default_out_dir(cfg, key)
    if storage.is_file(storage.join(out, MANIFEST)):
        m = read_manifest(out)
        _refuse_other(out, m.get("sample_key"), key)
        print(f"[sample] reusing complete set {out}", flush=True)
        tracking.reused("sample", key, out)
        return out, m
    plan = read_plan(out)
    if plan is not None:
        _refuse_other(out, plan.get("sample_key"), key)
    elif storage.list_files(out, recursive=False) or storage.list_dirs(out):
        raise DatasetError(f"{out}: exists without a manifest or {PLAN}; refusing to overwrite it")

    # The chunks still to sample (an interrupted run's shards are kept).
    init_ray(cfg.ray)
    plan = plan or _new_plan(out, key, gen_manifest, generator_dir, s, source_info)
    chunks = plan_chunks(plan["counts"], class_names, plan["chunk_size"])
    earlier = done_chunks(out, plan, chunks)
    skip = {c.name for c in earlier}
    todo = [c for c in chunks if c.name not in skip]
    if earlier:
        print(f"[sample] resuming {out}: {len(earlier)} of {len(chunks)} chunks already sampled", flush=True)
    if stop_after_rows is not None:
        rows, cut = 0, 0
        while cut < len(todo) and rows < stop_after_rows:
            rows, cut = rows + todo[cut].rows(plan["counts"]), cut + 1
        todo = todo[:cut]
    n = sum(c.rows(plan["counts"]) for c in todo)

    # Sample them: each actor writes its chunks' shards and returns their entries.
    intern = _Interner()
    t0 = time.time()
    entries = _sample_chunks(cfg, generator_dir, gen_manifest, out, plan, todo, intern, source) if todo else []
    seconds = time.time() - t0
    mode = "" if source is None else f", from real images at strength {s.strength:g}"
    print(f"[sample] {n} images in {seconds:.1f}s = {n / max(seconds, 1e-9):.1f} images/s "
          f"({s.sampler}, {s.steps} steps, w={s.guidance_scale}{mode})", flush=True)
    if stop_after_rows is not None:
        return out, {"sampled": n, "complete": False}

    # Finish: entries of earlier attempts' shards come from Ray Data tasks over those files.
    earlier_entries = [intern(e) for e in shard_stats(out, [shard_rel(plan["write_id"], c.name) for c in earlier],
                                                      len(class_names))]
    manifest = finish(cfg, out, plan["write_id"], earlier_entries + entries, extra={
        "sampled_this_run": n, "seconds_this_run": round(seconds, 2),
        "images_per_s_this_run": round(n / max(seconds, 1e-9), 2)})
    return out, manifest


def finish(cfg: Config, out: str, write_id: str | None = None, entries: Iterable[dict] | None = None, *,
           extra: dict | None = None) -> dict:
    """Commit a fully sampled set: completeness check, id check, manifest last; returns the manifest.

    ``entries`` are the shards' manifest entries (as ``write_shard`` returns them); None
    computes them from the shards (footers checked, figures from Ray Data tasks). Only the
    planned shard names of the plan's write id are ever read: a stray file is ignored and
    deleted. Duplicate rows cannot exist by construction (one shard per chunk with a fixed
    name, ids unique across chunks, a retried chunk rewrites its own shard); the id check
    of ``commit_dataset`` (Ray tasks over id hashes) verifies it. Driver memory is
    O(chunks) small entries, never rows.
    """
    from synthaug.raylocal import init_ray

    out = storage.absolute(str(out))
    plan = read_plan(out)
    if plan is None:
        raise DatasetError(f"{out}: no {PLAN}, so there is no unfinished sampled set here")
    if write_id is not None and write_id != plan["write_id"]:
        raise DatasetError(f"{out}: write id {write_id!r} is not the plan's ({plan['write_id']!r})")
    key = sample_key({"weights_hash": plan["generator_weights_hash"], "class_names": plan["class_names"]}, cfg.sample,
                     plan.get("source_content_hash"))
    _refuse_other(out, plan["sample_key"], key)
    init_ray(cfg.ray)
    class_names, wid = plan["class_names"], plan["write_id"]
    chunks = plan_chunks(plan["counts"], class_names, plan["chunk_size"])
    if entries is None:
        intern = _Interner()
        done = done_chunks(out, plan, chunks)
        entries = [intern(e) for e in shard_stats(out, [shard_rel(wid, c.name) for c in done], len(class_names))]

    # Completeness: every planned chunk has its shard, with the planned rows of each class.
    by_path = {e["path"]: e for e in entries}  # a chunk's entry twice is the same file twice
    missing, ordered = [], []
    for c in chunks:
        e = by_path.get(shard_rel(wid, c.name))
        want = [0] * len(class_names)
        for label, _, a, b in c.parts(plan["counts"], class_names):
            want[label] = b - a
        if e is None or list(e["counts"]) != want:
            missing.append(c)
        else:
            ordered.append(e)
    if missing:
        c = missing[0]
        raise DatasetError(f"{out}: {len(missing)} of {len(chunks)} planned chunks missing or wrong (first: "
                           f"{shard_rel(wid, c.name)}, {c.rows(plan['counts'])} images of "
                           f"{len(c.parts(plan['counts'], class_names))} classes); re-run sampling to complete")
    del by_path
    planned = {posixpath.basename(shard_rel(wid, c.name)) for c in chunks}
    for i in storage.list_files(storage.join(out, DATA_DIR, wid)):  # strays: temp files of killed writes
        if posixpath.basename(i.path) not in planned:
            storage.resolve(out)[0].delete_file(i.path)

    img2img = {} if cfg.sample.init != "real" else {"source_dir": plan.get("source"),
                                                    "source_content_hash": plan.get("source_content_hash")}
    manifest = commit_dataset(
        out, ordered, class_names=class_names, image_size=(plan["image_size"],) * 2, channels=plan["channels"],
        config=to_dict(cfg), check_ids=True, columns=columns(cfg.sample),
        extra={"stage": "sample", "sample_key": key, "generator_dir": plan["generator"],
               "generator_weights_hash": plan["generator_weights_hash"], "sample": to_dict(cfg.sample),
               "chunk_size": plan["chunk_size"], **img2img, **(extra or {})})
    storage.delete(storage.join(out, PLAN))
    return manifest
