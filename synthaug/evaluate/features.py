"""Features of a contract dataset through a Ray Data actor pool, reduced to mergeable statistics.

One streaming pass per dataset (:func:`dataset_statistics`)::

    read_ray(loc) -> map_batches(FeatureActor, actor pool; decode + torch-fidelity extractor)
                  -> map_batches(block_sums, tasks)     one row per block: sums + the block's subset rows
                  -> driver: merge sums, keep the subset

Per block, and per class, the FID layer's features are reduced to ``(n, sum x, sum x x^T)``
in float64; the driver adds them up, so the mean and the covariance (hence FID) are exact
for any N and any number of blocks, and the driver holds ``classes x D^2`` numbers
whatever N is (``per_class=False`` keeps one ``D^2``).

IS, KID and precision/recall need the features themselves: they run on a capped,
class-balanced, seeded subset (``max_samples``, default 50,000 as in FID@50K). Which rows
are in it is a pure function of (seed, id, label): per class, the rows whose
``keys.row_keys(id, seed, 'subset')`` are smallest, up to the class's quota -- so it does not
depend on partitioning or the pool size. Only the subset's features reach the driver.

The result is cached by content (dataset content hash, extractor, weights, row count,
layers, cap, seed) through :mod:`synthaug.storage`, so the cache may live on ``s3://``.
"""

from __future__ import annotations

import collections
import functools
import io
from dataclasses import dataclass, field

import numpy as np

from synthaug import raylocal, storage
from synthaug.artifacts import DatasetError, hash_obj, iter_batches, read_manifest, read_ray
from synthaug.evaluate.extractors import Extractor, _device, build_extractor, decode_images, extract_batch, resolve_extractor
from synthaug.keys import ALL, kth_smallest, row_keys
from synthaug.malloc import Trimmer

CACHE_VERSION = 3  # 3: the subset's keys are keys.row_keys
SUM_ROWS = 4096  # rows reduced per block_sums call: bounds the ratio of D^2 sums to features shipped
MAX_HASH = np.iinfo(np.uint64).max

# Rows run through an extractor in this process's pipelines, per extractor kind (cache checks).
EXTRACTED_ROWS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- the capped subset


def subset_keys(ids, seed: int) -> np.ndarray:
    """uint64 per-row keys of the subset choice: a pure function of (seed, id) (``keys.row_keys``)."""
    return row_keys(ids, seed, "subset")


def subset_quotas(counts: list[int], cap: int) -> list[int]:
    """Class-balanced quotas summing to ``min(cap, sum(counts))``: equal shares, water-filled.

    A class with fewer rows than its share keeps them all and the rest is shared by the
    others; the remainder of an uneven split goes to the lowest class indices.
    """
    counts = [int(c) for c in counts]
    if cap <= 0 or sum(counts) <= cap:
        return counts
    quota = [0] * len(counts)
    left, open_ = cap, [k for k, c in enumerate(counts) if c > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        nxt = []
        for j, k in enumerate(open_):
            want = share + (1 if j < extra else 0)
            take = min(want, counts[k] - quota[k])
            quota[k] += take
            left -= take
            if quota[k] < counts[k]:
                nxt.append(k)
        if nxt == open_ and share == 0:
            break
        open_ = nxt
    return quota


def _classes(manifest: dict) -> tuple[list[int], bool]:
    """Row counts per class (one bucket for an unlabelled set) and whether labels are used."""
    if manifest.get("labelled", True) and manifest.get("class_names"):
        return [int(manifest["counts"].get(n, 0)) for n in manifest["class_names"]], True
    return [int(manifest["num_rows"])], False


def _subset_batch_keys(batch, seed: int, labelled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(class, key) of a batch's rows for ``keys.kth_smallest`` (one class for an unlabelled set)."""
    keys = subset_keys(batch.column("id").to_pylist(), seed)
    lab = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64) if labelled else np.zeros(len(keys), np.int64)
    return lab, keys


def subset_thresholds(loc, manifest: dict, cap: int, seed: int) -> np.ndarray:
    """Per class, the largest key in the subset (rows with ``key <= threshold[label]`` are in it).

    Found by ``keys.kth_smallest`` over the id and label columns (bounded Ray Data passes);
    no pass at all when the set is within the cap.
    """
    counts, labelled = _classes(manifest)
    quotas = subset_quotas(counts, cap)
    thr = np.full(len(counts), MAX_HASH, np.uint64)
    if quotas == counts:
        return thr
    columns = ["id", "label"] if labelled else ["id"]
    cut = kth_smallest(read_ray(loc, columns=columns), dict(enumerate(quotas)), dict(enumerate(counts)),
                       functools.partial(_subset_batch_keys, seed=int(seed), labelled=labelled))
    for k, q in enumerate(quotas):  # quota 0: an empty class, nothing to select
        thr[k] = 0 if not q else MAX_HASH if cut[k] == ALL else cut[k]
    return thr


# ----------------------------------------------------------------------------- Ray Data stages


class FeatureActor:
    """Ray Data actor: decode a batch, run the extractor, mark the subset rows.

    The extractor is built once per actor from its (localised) weights; ``__call__`` is
    pure, so a retried batch gives the same rows.
    """

    def __init__(self, ex: Extractor, layers: list[str], image_size, where: str, thresholds: np.ndarray,
                 seed: int, labelled: bool, device: str | None = None):
        self.device = _device(device)
        raylocal.use_assigned_cpus()  # torch uses every CPU the actor was given
        self.fe = build_extractor(ex, layers, self.device)
        self.layers, self.image_size, self.where = list(layers), image_size, where
        self.thresholds, self.seed, self.labelled = np.asarray(thresholds, np.uint64), int(seed), labelled
        self.trimmer = Trimmer()  # freed batch buffers back to the OS now and then (synthaug.malloc)

    def __call__(self, batch: dict) -> dict:
        self.trimmer.tick()
        ids = batch["id"]
        images = decode_images(batch["image"], ids, self.image_size, self.where)  # (B, 3, H, W)
        feats = extract_batch(self.fe, images, self.device)
        group = np.asarray(batch["label"], np.int64) if self.labelled else np.zeros(len(ids), np.int64)
        selected = subset_keys(ids, self.seed) <= self.thresholds[group]
        return {"id": ids, "label": group, "selected": selected, **{f"feat_{n}": feats[n] for n in self.layers}}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unnpz(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def block_sums(batch: dict, fid_layer: str, layers: list[str], per_class: bool) -> dict:
    """One block of feature rows -> one row: per-group ``(n, sum, sum of outer products)`` + subset rows."""
    f = np.asarray(batch[f"feat_{fid_layer}"], np.float64)  # (B, D)
    group = np.asarray(batch["label"], np.int64) if per_class else np.zeros(len(f), np.int64)
    classes = np.unique(group)
    n = np.array([(group == k).sum() for k in classes], np.int64)
    sums = np.stack([f[group == k].sum(0) for k in classes])  # (k, D)
    outer = np.stack([f[group == k].T @ f[group == k] for k in classes])  # (k, D, D)
    sel = np.asarray(batch["selected"], bool)
    subset = _npz(ids=np.asarray(batch["id"][sel], dtype=str), labels=np.asarray(batch["label"], np.int64)[sel],
                  **{f"layer_{n_}": np.asarray(batch[f"feat_{n_}"], np.float32)[sel] for n_ in layers})
    stats = _npz(classes=classes, n=n, sums=sums, outer=outer)
    return {"rows": np.array([len(f)]), "stats": np.array([stats], dtype=object), "subset": np.array([subset], dtype=object)}


# ----------------------------------------------------------------------------- merged statistics


@dataclass
class DatasetStatistics:
    """Merged FID statistics of a dataset (per class or one group) and its capped subset's features."""

    n: np.ndarray  # (G,) rows per group (class, or one group)
    sums: np.ndarray  # (G, D) float64 sums of the FID layer's features
    outer: np.ndarray  # (G, D, D) float64 sums of outer products
    subset_ids: np.ndarray  # (S,) ids of the capped subset
    subset_labels: np.ndarray  # (S,)
    subset: dict = field(default_factory=dict)  # layer -> float32 (S, D_layer)

    @property
    def num_rows(self) -> int:
        return int(self.n.sum())

    def fid_stats(self, group: int | None = None) -> dict:
        """torch-fidelity's ``{"mu", "sigma"}`` (float64, covariance with ddof=1) of all rows or one group."""
        if group is None:
            n, s, ss = self.n.sum(), self.sums.sum(0), self.outer.sum(0)
        else:
            n, s, ss = self.n[group], self.sums[group], self.outer[group]
        return mean_cov(int(n), s, ss)

    def to_bytes(self) -> bytes:
        return _npz(n=self.n, sums=self.sums, outer=self.outer, subset_ids=self.subset_ids.astype(str),
                    subset_labels=self.subset_labels, **{f"layer_{k}": v for k, v in self.subset.items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> "DatasetStatistics":
        z = _unnpz(data)
        layers = {k[len("layer_"):]: z[k] for k in z if k.startswith("layer_")}
        return cls(z["n"], z["sums"], z["outer"], z["subset_ids"], z["subset_labels"], layers)


def mean_cov(n: int, s: np.ndarray, ss: np.ndarray) -> dict:
    """Mean and unbiased covariance from ``n``, the sum and the sum of outer products (float64)."""
    if n < 2:
        raise DatasetError(f"a covariance needs at least 2 samples, got {n}")
    mu = s / n
    sigma = (ss - np.outer(s, mu)) / (n - 1)
    return {"mu": mu, "sigma": (sigma + sigma.T) / 2}


class _Merger:
    """Adds block rows into per-group sums and collects the subset (driver memory: G x D^2 + cap)."""

    def __init__(self, groups: int, layers: list[str]):
        self.groups, self.layers = groups, layers
        self.n = np.zeros(groups, np.int64)
        self.sums = self.outer = None
        self.ids, self.labels, self.feats = [], [], {n: [] for n in layers}

    def add(self, row: dict) -> None:
        st = _unnpz(row["stats"])
        if self.sums is None:
            d = st["sums"].shape[1]
            self.sums, self.outer = np.zeros((self.groups, d)), np.zeros((self.groups, d, d))
        for j, k in enumerate(st["classes"]):
            self.n[k] += st["n"][j]
            self.sums[k] += st["sums"][j]
            self.outer[k] += st["outer"][j]
        sub = _unnpz(row["subset"])
        self.ids.append(sub["ids"])
        self.labels.append(sub["labels"])
        for n in self.layers:
            self.feats[n].append(sub[f"layer_{n}"])

    def result(self) -> DatasetStatistics:
        # A canonical subset order (by id), so results do not depend on block order.
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, str)
        order = np.argsort(ids, kind="stable")
        cat = lambda parts: np.concatenate(parts)[order]  # noqa: E731
        return DatasetStatistics(self.n, self.sums, self.outer, ids[order], cat(self.labels),
                                 {n: cat(v) for n, v in self.feats.items()})


def manifest_order(loc, stats: DatasetStatistics, batch_size: int = 65536) -> DatasetStatistics:
    """The subset's rows in the dataset's own order (manifest shards, rows within them).

    That is the order torch-fidelity would see (IS splits and KID subsets depend on it),
    and a property of the dataset, not of Ray's partitioning. Streams the id column;
    holds only the subset's positions.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(stats.subset_ids) == 0:
        return stats
    want = pa.array([str(i) for i in stats.subset_ids], pa.string())
    pos, offset = {}, 0
    for b in iter_batches(loc, columns=["id"], batch_size=batch_size):
        hit = np.flatnonzero(np.asarray(pc.is_in(b.column("id"), value_set=want)))
        ids = b.column("id")
        pos.update((ids[int(i)].as_py(), offset + int(i)) for i in hit)
        offset += b.num_rows
    order = np.argsort([pos[str(i)] for i in stats.subset_ids], kind="stable")
    return DatasetStatistics(stats.n, stats.sums, stats.outer, stats.subset_ids[order], stats.subset_labels[order],
                             {k: v[order] for k, v in stats.subset.items()})


def cache_key(manifest: dict, ex: Extractor, layers, max_samples: int, seed: int, per_class: bool) -> str:
    """Content key of a set's statistics: images, extractor, weights, count, layers, cap, seed."""
    return hash_obj({
        "version": CACHE_VERSION, "content_hash": manifest["content_hash"], "extractor": ex.tf_name,
        "weights_sha256": ex.weights_sha256, "num_rows": manifest["num_rows"], "layers": sorted(set(layers)),
        "max_samples": int(max_samples), "seed": int(seed), "per_class": bool(per_class),
    })


def _unwrap(e: BaseException) -> BaseException:
    """The DatasetError behind a Ray Data failure (the actor names the bad row), if any."""
    seen = e
    while seen is not None:
        if isinstance(seen, DatasetError):
            return DatasetError(str(seen).splitlines()[-1] if "\n" in str(seen) else str(seen))
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    if "DatasetError" in text:
        line = next(ln for ln in reversed(text.splitlines()) if "DatasetError" in ln)
        return DatasetError(line.split("DatasetError:", 1)[-1].strip())
    return e


def dataset_statistics(
    loc,
    extractor: Extractor | str,
    *,
    layers=None,
    batch_size: int = 64,
    max_samples: int = 50_000,
    seed: int = 0,
    per_class: bool = True,
    cache_dir=None,
    min_actors: int = 1,
    max_actors: int = 1,
    num_gpus: float = 0.0,
    device: str | None = None,
) -> DatasetStatistics:
    """Merged FID statistics and the capped subset's features of the dataset at ``loc``.

    ``extractor`` is a resolved :class:`Extractor` or an in-domain classifier location.
    ``layers`` default to every metric layer of the extractor; the first metric's (FID's)
    layer is the one summed. Driver memory is flat in N: ``groups x D^2`` sums plus at
    most ``max_samples`` subset rows. With ``cache_dir`` (any location) the result is
    stored under a content key and reused.
    """
    import ray

    ex = extractor if isinstance(extractor, Extractor) else resolve_extractor("in-domain", extractor)
    fid_layer = ex.layers["fid"]
    layers = sorted(set(layers or ex.layers.values()) | {fid_layer})
    manifest = read_manifest(loc)
    if manifest["num_rows"] == 0:
        raise DatasetError(f"{loc}: empty dataset (0 rows); nothing to measure")
    counts, labelled = _classes(manifest)
    grouped = per_class and labelled
    cache_file = None
    if cache_dir is not None:
        key = cache_key(manifest, ex, layers, max_samples, seed, grouped)[:32]
        cache_file = storage.join(cache_dir, f"{ex.kind}-{key}.npz")
        if storage.is_file(cache_file):
            try:
                return DatasetStatistics.from_bytes(storage.read_bytes(cache_file))
            except (OSError, KeyError, ValueError) as e:
                import warnings

                warnings.warn(f"{cache_file}: unreadable statistics cache ({e}); recomputing")

    # Which rows form the capped subset (ids and labels only), then one streaming pass.
    if not ray.is_initialized():
        raylocal.init_ray()
    thresholds = subset_thresholds(loc, manifest, max_samples, seed)
    ds = read_ray(loc, columns=["id", "image", "label"])
    ds = ds.map_batches(
        batch_size=batch_size, batch_format="numpy",
        **raylocal.map_pool_kwargs(
            FeatureActor, dict(ex=ex, layers=layers, image_size=manifest["image_size"], where=str(loc),
                               thresholds=thresholds, seed=seed, labelled=labelled, device=device),
            rows=manifest["num_rows"], min_size=min_actors, max_size=max_actors, num_gpus=num_gpus),
    )
    ds = ds.map_batches(block_sums, batch_size=SUM_ROWS, batch_format="numpy",
                        fn_kwargs=dict(fid_layer=fid_layer, layers=layers, per_class=grouped))
    # A fixed order of rows, blocks and partial sums: float sums then repeat bit for bit.
    ds.context.execution_options.preserve_order = True
    merger = _Merger(len(counts) if grouped else 1, layers)
    try:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            merger.add({"stats": batch["stats"][0], "subset": batch["subset"][0]})
    except Exception as e:  # noqa: BLE001 - re-raised, as the DatasetError it wraps when there is one
        err = _unwrap(e)
        if err is e:
            raise
        raise err from None
    stats = manifest_order(loc, merger.result())
    EXTRACTED_ROWS[ex.kind] += stats.num_rows
    if stats.num_rows != manifest["num_rows"]:
        raise DatasetError(f"{loc}: read {stats.num_rows} rows, the manifest says {manifest['num_rows']}")
    if cache_file is not None:
        storage.write_bytes(cache_file, stats.to_bytes())
    return stats
