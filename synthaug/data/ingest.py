"""Ingest real labelled images into contract datasets: ``train``, ``val`` and (low-data) ``pool``.

Sources (see :mod:`synthaug.data.sources`): scikit-learn's bundled ``load_digits`` (the
offline default), an image folder ``root/<class>/<image>`` (PNG, JPEG, WebP) and a Parquet
file or directory with image and label columns, at any storage location.

Ingest streams; no process holds the dataset:

1. *Listing* (driver): file names and labels, or Parquet row groups from the footers,
   packed into chunks of about ``ingest.chunk_size`` images. Bad paths, empty class
   folders, missing columns and non-integer label columns fail here.
2. *Pre-pass* (Ray Data tasks, one per chunk): ids and labels only (Parquet: the label
   column), hashed; each chunk returns per-class counts and a few candidates, which the
   driver merges into the split plan (O(classes x k)). Labels out of range, classes too
   small and k too large fail here.
3. *Main pass* (Ray Data tasks, one per chunk, spread over the cluster's CPUs): decode,
   validate, normalise (mode, resize), encode PNG, lay the rows out by a seeded hash of
   their ids (``shuffle.layout_order``) and write shards of about ``chunk_size`` rows per
   split with :func:`artifacts.write_shard` under a fresh write id (deterministic names,
   so a retried task overwrites its own shards). The listing is in a seeded order too
   (files by id hash; Parquet row groups shuffled, up to ``sources.PARQUET_MIX`` x
   ``chunk_size`` rows of them per chunk), so every shard mixes classes even when the
   source is sorted by label. Each task returns its shard entries and
   the image mode and size it saw, with an example file.
4. *Commit* (driver): mixed modes (``ingest.mode: ''``) or sizes (``ingest.image_size: 0``)
   across chunks fail naming a file; otherwise one manifest per split is written with
   :func:`artifacts.commit_dataset`. After any failure the write id's shards are deleted
   and nothing was committed, so earlier outputs in ``out_dir`` stay as they were.

The split rule, a function of (seed, id, label) only: never of chunking, ordering or the
number of workers. With ``d = blake2b(id, digest_size=16, key=f"synthaug-ingest-{seed}")`` (``keys.row_keys``),
``h1`` = its first 8 bytes and ``h2`` the next 8, both little-endian uint64:

- a row is *val* iff ``h1 < floor(val_fraction * 2**64)``, i.e. ``u = h1 / 2**64 < val_fraction``;
- with ``test_fraction > 0`` a row is *test* iff ``val_fraction <= u < val_fraction + test_fraction``:
  the reported split, never trained or chosen on (``test_path`` instead makes every row of a
  second source test, e.g. an official test set);
- a class needs at least 2 images. If none of a class's rows is val by that rule, its row
  with the smallest ``(h1, id)`` is val; if all of them are, its row with the largest
  ``(h1, id)`` is train (so both parts are never empty);
- with ``k_per_class = k > 0``, the class's train rows with the k smallest ``(h2, id)`` stay
  in ``train`` (labelled) and the rest go to ``pool`` (unlabelled); ``train_full`` is all
  of them. A class with fewer than k train rows is an error naming the class.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from synthaug import storage, tracking
from synthaug.artifacts import UNLABELLED, DatasetError, commit_dataset, is_complete, new_write_id, read_manifest, write_shard
from synthaug.config import Config, ConfigError, IngestConfig, to_dict
from synthaug.data import sources
from synthaug.data.images import encode_png
from synthaug.keys import row_keys, smallest_per_class
from synthaug.shuffle import layout_order

VAL, TRAIN, POOL, TEST = 0, 1, 2, 3
CANDIDATE_ROWS = 200_000  # the driver reduces merged pre-pass candidates beyond this many rows


# ----------------------------------------------------------------------------- split rule


def split_keys(ids, seed: int) -> np.ndarray:
    """``(N, 2)`` uint64: ``h1`` (val or not) and ``h2`` (rank for the k-per-class cut) of each id."""
    return row_keys(ids, seed, "ingest", words=2).reshape(-1, 2)


def val_threshold(val_fraction: float) -> int:
    """Rows with ``h1`` below this are val."""
    return min(int(val_fraction * 2.0**64), 2**64 - 1)


def held_masks(h1: np.ndarray, cfg: IngestConfig) -> tuple[np.ndarray, np.ndarray]:
    """(val, test) by the rule alone: ``h1`` below the val threshold, or between it and the test one."""
    val = h1 < np.uint64(val_threshold(cfg.val_fraction))
    test = ~val & (h1 < np.uint64(val_threshold(cfg.val_fraction + cfg.test_fraction))) if cfg.test_fraction else \
        np.zeros(len(h1), bool)
    return val, test


def assign_splits(ids, labels: np.ndarray, plan: dict) -> np.ndarray:
    """Per row VAL, TRAIN, POOL or TEST, from the plan of :func:`plan_splits` (pure; any chunk of rows)."""
    ids = np.asarray(ids, dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    if plan.get("all_test"):  # the rows of ingest.test_path
        return np.full(len(ids), TEST)
    h = split_keys(ids, plan["seed"])
    val = h[:, 0] < np.uint64(plan["val_threshold"])
    test = ~val & (h[:, 0] < np.uint64(plan["test_threshold"])) if plan.get("test_threshold") else np.zeros(len(ids), bool)
    for forced, value in ((plan["forced_val"], True), (plan["forced_train"], False)):
        if forced:
            wanted = set(forced.values())
            hit = np.fromiter((i in wanted for i in ids), bool, len(ids))
            val[hit] = value
    codes = np.where(val, VAL, np.where(test, TEST, TRAIN))
    if plan["k"]:
        thr = np.asarray(plan["k_h2"], dtype=np.uint64)[labels]
        thr_id = np.asarray(plan["k_id"], dtype=object)[labels]
        keep = h[:, 1] < thr
        tie = h[:, 1] == thr
        keep[tie] = ids[tie] <= thr_id[tie]  # Python str order == Arrow's (UTF-8 bytes)
        codes[~val & ~test & ~keep] = POOL
    return codes


_SCHEMAS = {
    "cand": pa.schema([("label", pa.int64()), ("h2", pa.uint64()), ("id", pa.string())]),
    "low": pa.schema([("label", pa.int64()), ("h1", pa.uint64()), ("id", pa.string())]),
    "high": pa.schema([("label", pa.int64()), ("h1", pa.uint64()), ("h2", pa.uint64()), ("id", pa.string())]),
}


def _ipc(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def _unipc(b: bytes) -> pa.Table:
    return pa.ipc.open_stream(b).read_all()


def _prepass_chunk(batch: pa.Table, cfg: IngestConfig) -> pa.Table:
    """Ray Data task: one chunk's per-class counts and split candidates (an error row on bad input)."""
    desc = batch.to_pylist()[0]
    try:
        ids, labels = sources.chunk_labels(cfg, desc)
    except DatasetError as e:
        return _error_row(desc["chunk"], e)
    h = split_keys(ids, cfg.seed)
    val, test = held_masks(h[:, 0], cfg)
    n = int(labels.max()) + 1 if len(labels) else 0
    rows = pa.table({"label": labels, "h1": h[:, 0], "h2": h[:, 1], "id": pa.array(ids, pa.string())})
    train, held = rows.filter(pa.array(~val & ~test)), rows.filter(pa.array(val))
    k = cfg.k_per_class
    parts = {
        "cand": smallest_per_class(train.select(["label", "h2", "id"]), "h2", k + 1) if k else _SCHEMAS["cand"].empty_table(),
        "low": smallest_per_class(train.select(["label", "h1", "id"]), "h1", 1),
        "high": smallest_per_class(held, "h1", 1, descending=True),
    }
    return pa.table({
        "chunk": [desc["chunk"]], "error": [""],
        "n_val": [np.bincount(labels[val], minlength=n).tolist()],
        "n_train": [np.bincount(labels[~val & ~test], minlength=n).tolist()],
        **{name: pa.array([_ipc(t)], pa.binary()) for name, t in parts.items()},
    })


class _PlanMerger:
    """Sums the pre-pass rows in the driver, keeping O(classes x k) candidates."""

    def __init__(self, k: int):
        self.k, self.n_val, self.n_train = k, np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.parts: dict[str, list[pa.Table]] = {name: [s.empty_table()] for name, s in _SCHEMAS.items()}
        self.rows = 0

    def add(self, row: dict) -> None:
        for name in ("n_val", "n_train"):
            a, b = getattr(self, name), np.asarray(row[name], np.int64)
            n = max(len(a), len(b))
            setattr(self, name, np.pad(a, (0, n - len(a))) + np.pad(b, (0, n - len(b))))
        for name in _SCHEMAS:
            t = _unipc(row[name])
            self.parts[name].append(t)
            self.rows += len(t)
        if self.rows > CANDIDATE_ROWS:
            self.reduce()

    def reduce(self) -> dict[str, pa.Table]:
        keep = {"cand": ("h2", self.k + 1, False), "low": ("h1", 1, False), "high": ("h1", 1, True)}
        for name, (key, n, desc) in keep.items():
            self.parts[name] = [smallest_per_class(pa.concat_tables(self.parts[name]), key, n, desc)]
        self.rows = sum(len(p[0]) for p in self.parts.values())
        return {name: p[0] for name, p in self.parts.items()}


def plan_splits(merged: _PlanMerger, class_names: list[str], cfg: IngestConfig) -> tuple[dict, dict]:
    """The split plan for the tasks (O(classes)) and the per-class (val, train) counts; bad classes raise."""
    parts = merged.reduce()
    c = len(class_names)
    if c < 2:
        raise DatasetError(f"{cfg.path or cfg.source}: {c} class ({class_names}); a classifier needs at least 2 classes")
    n_val = np.pad(merged.n_val, (0, max(0, c - len(merged.n_val))))
    n_train = np.pad(merged.n_train, (0, max(0, c - len(merged.n_train))))
    low = dict(zip(parts["low"].column("label").to_pylist(), parts["low"].column("id").to_pylist()))
    high = {y: (i, h2) for y, i, h2 in zip(*(parts["high"].column(n).to_pylist() for n in ("label", "id", "h2")))}
    forced_val, forced_train, k = {}, {}, cfg.k_per_class
    for y, name in enumerate(class_names):
        if n_val[y] + n_train[y] < 2:
            after = f" outside the test split (ingest.test_fraction={cfg.test_fraction:g})" if cfg.test_fraction else ""
            raise DatasetError(f"class '{name}' has {n_val[y] + n_train[y]} image(s){after}; need at least 2 for a "
                               "train/val split")
        if n_val[y] == 0:
            forced_val[y] = low[y]
            n_val[y], n_train[y] = 1, n_train[y] - 1
        elif n_train[y] == 0:
            forced_train[y] = high[y][0]
            n_val[y], n_train[y] = n_val[y] - 1, 1
        if k and k > n_train[y]:
            raise DatasetError(f"ingest.k_per_class={k} is larger than class '{name}', which has {n_train[y]} train images")
    plan = {"seed": cfg.seed, "val_threshold": val_threshold(cfg.val_fraction), "k": k,
            "test_threshold": val_threshold(cfg.val_fraction + cfg.test_fraction) if cfg.test_fraction else 0,
            "forced_val": forced_val, "forced_train": forced_train, "k_h2": [], "k_id": []}
    if k:
        cand = parts["cand"]
        if forced_val:
            cand = cand.filter(pc.invert(pc.is_in(cand.column("id"), pa.array(list(forced_val.values()), pa.string()))))
        extra = pa.table({"label": pa.array(list(forced_train), pa.int64()),
                          "h2": pa.array([high[y][1] for y in forced_train], pa.uint64()),
                          "id": pa.array([high[y][0] for y in forced_train], pa.string())})
        top = smallest_per_class(pa.concat_tables([cand, extra]), "h2", k)
        last = smallest_per_class(top, "h2", 1, descending=True)  # the k-th of each class: the cut
        cut = {y: (h2, i) for y, h2, i in zip(*(last.column(n).to_pylist() for n in ("label", "h2", "id")))}
        plan["k_h2"] = [cut[y][0] for y in range(c)]
        plan["k_id"] = [cut[y][1] for y in range(c)]
    return plan, {"val": n_val, "train": n_train}


# ----------------------------------------------------------------------------- main pass


def normalise(img, where: str, cfg: IngestConfig, seen: dict):
    """Convert to the target mode and size; a second raw mode or size within a chunk raises."""
    if not cfg.mode:
        mode0 = seen.setdefault("mode", (img.mode, where))
        if img.mode != mode0[0]:
            raise DatasetError(_mixed_modes(img.mode, where, *mode0))
    target = cfg.mode or (img.mode if img.mode in ("L", "RGB") else "RGB")  # palette, RGBA, CMYK ... -> RGB
    img = img.convert(target) if img.mode != target else img
    if cfg.image_size:
        return img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
    size0 = seen.setdefault("size", (list(img.size), where))
    if list(img.size) != size0[0]:
        raise DatasetError(_mixed_sizes(list(img.size), where, *size0))
    return img


def _mixed_modes(mode, where, mode0, where0) -> str:
    return (f"{where}: image mode {mode!r} differs from {mode0!r} ({where0}); "
            "mixed image modes -- set ingest.mode to 'L' or 'RGB' to convert them")


def _mixed_sizes(size, where, size0, where0) -> str:
    return f"{where}: size {tuple(size)} differs from {tuple(size0)} ({where0}); set ingest.image_size to resize"


def _error_row(chunk: int, e: DatasetError) -> pa.Table:
    return pa.table({"chunk": [chunk], "error": [str(e)]})


def _ingest_chunk(batch: pa.Table, cfg: IngestConfig, plan: dict, out: str, write_id: str,
                  class_names: list[str], splits: list[str]) -> pa.Table:
    """Ray Data task: decode, check, normalise and encode one chunk; write its shard of each split."""
    desc = batch.to_pylist()[0]
    chunk = desc["chunk"]
    ids, labels, pngs, seen = [], [], [], {}
    try:
        for i, y, where, img in sources.chunk_images(cfg, desc):
            if not 0 <= y < len(class_names):
                raise DatasetError(f"{where}: label {y} is outside the {len(class_names)} classes {class_names}")
            img = normalise(img, where, cfg, seen)
            ids.append(i), labels.append(y), pngs.append(encode_png(np.asarray(img, dtype=np.uint8)))
    except DatasetError as e:
        return _error_row(chunk, e)
    order = layout_order(ids, cfg.seed)  # the shard's rows by id hash: classes interleave within it
    ids, labels, pngs = [ids[i] for i in order], [labels[i] for i in order], [pngs[i] for i in order]
    codes = assign_splits(ids, np.asarray(labels, np.int64), plan)
    table = pa.table({
        "id": pa.array(ids, pa.string()), "image": pa.array(pngs, pa.binary()),
        "label": pa.array(labels, pa.int64()), "class_name": pa.array([class_names[y] for y in labels], pa.string()),
        "source": pa.array(["real"] * len(ids), pa.string()),
    })
    masks = {"val": codes == VAL, "train": codes == TRAIN, "pool": codes == POOL, "test": codes == TEST,
             "train_full": (codes == TRAIN) | (codes == POOL)}
    entries = {}
    for split in splits:
        part = table.filter(pa.array(masks[split]))
        if split == "pool":
            part = part.set_column(2, "label", pa.array(np.full(len(part), UNLABELLED), pa.int64()))
            part = part.set_column(3, "class_name", pa.array([""] * len(part), pa.string()))
        # Shards of about chunk_size rows, dealt round-robin from the id-hash order: each mixes
        # every source file and row group of the chunk.
        n = -(-len(part) // cfg.chunk_size)
        entries[split] = [write_shard(storage.join(out, split), write_id, f"part-{chunk:06d}-{k:03d}",
                                      part.take(pa.array(np.arange(k, len(part), n))), class_names)
                          for k in range(n)]
    mode, mode_where = seen.get("mode", ("", ""))
    size, size_where = seen.get("size", ([], ""))
    return pa.table({"chunk": [chunk], "error": [""], "entries": [json.dumps(entries)], "mode": [mode],
                     "mode_where": [mode_where], "size": [json.dumps(size)], "size_where": [size_where]})


# ----------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _task_errors():
    """Re-raise a DatasetError raised inside a Ray task as itself (its message), not a Ray traceback."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as e:  # ray.exceptions.RayTaskError and the errors it wraps
        cause = e
        for _ in range(8):
            if isinstance(cause, DatasetError):
                raise DatasetError(str(cause.args[0] if cause.args else cause)) from None
            cause = getattr(cause, "cause", None) or cause.__cause__
            if cause is None:
                break
        raise


def _rows(ds):
    """The result rows of a per-chunk pass; the first error row raises (which stops the pass)."""
    with _task_errors():
        for batch in ds.iter_batches(batch_size=64, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["error"]:
                    raise DatasetError(row["error"])
                yield row


def _output_splits(cfg: IngestConfig) -> list[str]:
    """The splits this source's rows go to (``test`` from ``test_path`` is ingested apart)."""
    test = ["test"] if cfg.test_fraction else []
    if not cfg.k_per_class:
        return ["train", "val"] + test
    return ["train", "val"] + (["pool"] if cfg.unlabelled_pool else []) + ["train_full"] + test


def _image_geometry(results: list[dict], cfg: IngestConfig) -> tuple[tuple[int, int], int]:
    """The one (height, width) and channel count of all chunks; a chunk that differs raises naming a file."""
    first = results[0]
    for r in results[1:]:
        if not cfg.mode and r["mode"] != first["mode"]:
            raise DatasetError(_mixed_modes(r["mode"], r["mode_where"], first["mode"], first["mode_where"]))
        if not cfg.image_size and r["size"] != first["size"]:
            raise DatasetError(_mixed_sizes(json.loads(r["size"]), r["size_where"], json.loads(first["size"]),
                                            first["size_where"]))
    mode = cfg.mode or (first["mode"] if first["mode"] in ("L", "RGB") else "RGB")
    w, h = (cfg.image_size, cfg.image_size) if cfg.image_size else json.loads(first["size"])
    return (h, w), 1 if mode == "L" else 3


@contextlib.contextmanager
def _all_cpus_to_tasks():
    """Ray Data without its per-operator resource reservation, for ingest's two passes only.

    Each pass is one small input (the chunk descriptors) feeding CPU-bound tasks whose
    outputs are a row each, so there is nothing to reserve for; with the reservation on,
    measured on 2 CPUs, only ~1.3 of them were busy (20k images: 5.4 s, against 3.2 s off).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


_TASK = {"batch_size": 1, "batch_format": "pyarrow", "num_cpus": 1}


def _main_pass(chunks, ic: IngestConfig, plan: dict, out: str, write_id: str, class_names: list[str],
               splits: list[str]) -> list[dict]:
    kwargs = {"cfg": ic, "plan": plan, "out": out, "write_id": write_id, "class_names": class_names, "splits": splits}
    return sorted(_rows(chunks.map_batches(_ingest_chunk, fn_kwargs=kwargs, **_TASK)), key=lambda r: r["chunk"])


def _test_config(ic: IngestConfig) -> IngestConfig:
    from synthaug.config import replace

    return replace(ic, path=ic.test_path, test_path="", k_per_class=0)


def _test_listing(ic: IngestConfig, listing):
    """The listing of ``ingest.test_path`` (None without one); its classes must be the train source's."""
    if not ic.test_path:
        return None
    test = sources.list_source(_test_config(ic))
    if listing.class_names and test.class_names and list(test.class_names) != list(listing.class_names):
        raise DatasetError(f"{ic.test_path}: test classes {list(test.class_names)} differ from "
                           f"{list(listing.class_names)} in {ic.path}")
    return test


def ingest_key(ic, fingerprint: str) -> str:
    """The content key of an ingest: the result-changing ``ingest`` fields and the source's fingerprint."""
    from synthaug import identity

    return identity.artifact_key("ingest", identity.config_fields("ingest", ic), {"source": fingerprint})


def run(cfg: Config, out_dir: str) -> dict[str, dict]:
    """Ingest per ``cfg.ingest`` into ``out_dir/{train,val[,pool,train_full]}``; returns manifests.

    In the low-data regime ``train`` keeps k labelled images per class, ``pool`` holds the
    rest of the train split without labels, and ``train_full`` the whole labelled train
    split. ``train_full`` is used only to train the evaluation's in-domain feature
    extractor (an oracle, like ImageNet-trained Inception), never by the generator or
    the classifiers being compared. ``out_dir`` is any storage location.
    """
    import ray.data

    from synthaug.raylocal import init_ray

    ic = cfg.ingest
    if ic.chunk_size < 1:
        raise ConfigError("config key 'ingest.chunk_size' must be >= 1")
    out = storage.absolute(str(out_dir))

    # List (driver); a complete earlier ingest of the same source and config is reused.
    listing = sources.list_source(ic)
    test_listing = _test_listing(ic, listing)
    fingerprint = listing.fingerprint + (f"+test:{test_listing.fingerprint}" if test_listing else "")
    key = ingest_key(ic, fingerprint)
    splits = _output_splits(ic)
    locations = {s: storage.join(out, s) for s in splits}
    locations.update({"test": storage.join(out, "test")} if test_listing else {})
    done = {s: read_manifest(d) if is_complete(d) else {} for s, d in locations.items()}
    if all(m.get("key") == key for m in done.values()):
        print(f"[ingest] {out}: reusing the datasets (same source and config, key {key[:12]})", flush=True)
        tracking.reused("ingest", key, out)
        return done

    # The split pre-pass over ids and labels (tasks).
    init_ray(cfg.ray)
    write_id = new_write_id()
    with _all_cpus_to_tasks():  # a Dataset keeps the DataContext it was created under
        chunks = ray.data.from_arrow(listing.chunks)  # the descriptors now live in the object store
        listing.chunks.clear()
        merged = _PlanMerger(ic.k_per_class)
        for row in _rows(chunks.map_batches(_prepass_chunk, fn_kwargs={"cfg": ic}, **_TASK)):
            merged.add(row)
        class_names = listing.class_names or [str(y) for y in range(len(merged.n_val))]
        plan, _ = plan_splits(merged, class_names, ic)

        # Decode, normalise, encode and write shards (tasks); collect one small row per chunk.
        try:
            results = _main_pass(chunks, ic, plan, out, write_id, class_names, splits)
            if test_listing is not None:
                splits.append("test")
                results += _main_pass(ray.data.from_arrow(test_listing.chunks), _test_config(ic), {"all_test": True},
                                      out, write_id, class_names, ["test"])
            image_size, channels = _image_geometry(results, ic)
        except BaseException:
            for split in {*splits, "test"}:  # best effort: this attempt's shards only
                with contextlib.suppress(Exception):
                    storage.delete(storage.join(out, split, "data", write_id))
            raise

    # Commit: one manifest per split, each written last.
    manifests = {}
    for split in splits:
        entries = [e for r in results for e in json.loads(r["entries"]).get(split, [])]
        manifests[split] = commit_dataset(
            storage.join(out, split), entries, class_names=class_names, image_size=image_size, channels=channels,
            config=to_dict(cfg), labelled=split != "pool", check_ids=False,  # ids are unique by construction
            extra={"stage": "ingest", "split": split, "source": ic.source, "key": key,
                   "source_fingerprint": fingerprint},
        )
    return manifests
