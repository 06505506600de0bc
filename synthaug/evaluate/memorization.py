"""Near-copy audit: does the generator reproduce its training images?

For each synthetic image, the nearest real *train* image (L2, over all classes) in
feature space and, optionally, in pixel space. A synthetic image counts as a near copy
when that distance is at most the ``percentile``-th percentile of the distances from
real *val* images to their nearest train image: real held-out images are the yardstick
of "as close as two different real images of this domain get". With the default 5th
percentile, a generator that never copies still flags about 5% of its samples if they
are as close to train as val is -- compare the share with ``percentile``, not with 0.

Any size: features are extracted once per set by the Ray Data actor pool of
:mod:`synthaug.evaluate.features` into a feature store (Parquet, content-keyed, through
:mod:`synthaug.storage`). The search then streams the query set in chunks against the
train set in chunks -- chunked matrix products in torch, on this process's accelerator
when it has one -- keeping a running minimum per query row; it never holds both feature
matrices. Pixel space streams the datasets' images the same way. What is held: one
query chunk and one train chunk, the val-to-train distances (one float per val row, for
the percentile), per-class counts, and the ``top_k`` closest pairs (the only images kept).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from synthaug import raylocal, storage
from synthaug.artifacts import DatasetError, hash_obj, iter_batches, new_write_id, read_manifest, read_ray
from synthaug.data.images import decode_batch, to_float
from synthaug.evaluate.extractors import Extractor, _device, resolve_extractor
from synthaug.evaluate.features import EXTRACTED_ROWS, MAX_HASH, FeatureActor

STORE_VERSION = 1
PIXEL_CHUNK_BYTES = 256 << 20  # float32 bytes per pixel-space chunk


@dataclass(frozen=True)
class Pair:
    """A synthetic image and its nearest real train image (images: uint8 ``(C, H, W)``)."""

    synthetic_id: str
    train_id: str
    distance: float  # feature-space L2
    pixel_distance: float  # pixel-space L2 in [-1, 1] units to the same train image; NaN if not computed
    synthetic_label: int
    train_label: int
    synthetic_image: np.ndarray
    train_image: np.ndarray

    def as_row(self) -> dict:
        """The JSON-able part (no images)."""
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_image")}


# ----------------------------------------------------------------------------- the chunked search


Chunk = tuple[list, np.ndarray, np.ndarray]  # ids, labels (n,), float32 vectors (n, D)


def _readonly_tensor(a, device) -> torch.Tensor:
    """float32 features as a tensor without a copy. Rows read from Arrow are read-only arrays, which
    torch warns about; the distance code only reads them, so the warning is silenced here alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


def nearest_chunked(query: np.ndarray, ref_chunks: Iterable[Chunk], device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query row (n, D): L2 distance to, id of and label of its nearest row over all ref chunks.

    Each ref chunk costs one matrix product (squared distances via ``|q|^2 + |r|^2 - 2 q r^T``);
    the winner's distance is then recomputed from the difference, so exact copies come out
    at exactly 0. A running minimum per query row keeps the first of equal distances.
    """
    q = _readonly_tensor(query, device)  # (n, D)
    qn = (q * q).sum(1)
    best = torch.full((len(q),), float("inf"), dtype=torch.float32, device=device)
    best_id = np.full(len(q), None, dtype=object)
    best_label = np.full(len(q), -1, dtype=np.int64)
    for ids, labels, ref in ref_chunks:
        if len(ref) == 0:
            continue
        r = _readonly_tensor(ref, device)  # (m, D)
        d2 = qn[:, None] + (r * r).sum(1)[None, :] - 2.0 * (q @ r.T)  # (n, m)
        j = d2.argmin(1)
        exact = (q - r[j]).norm(dim=1)  # (n,)
        better = (exact < best).cpu().numpy()
        best = torch.minimum(best, exact)
        jj = j.cpu().numpy()[better]
        best_id[better] = np.asarray(ids, dtype=object)[jj]
        best_label[better] = np.asarray(labels)[jj]
    return best.cpu().numpy().astype(np.float64), best_id, best_label


def nearest(query: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """In-memory convenience: for each row of ``query`` (N, D), the distance to and index of its nearest ``ref`` row."""
    spans = [np.arange(i, min(i + chunk, len(ref))) for i in range(0, len(ref), chunk)]
    d, idx, _ = nearest_chunked(query, ((s, s, ref[s[0]:s[-1] + 1]) for s in spans), _device(None))
    return d, idx.astype(np.int64)


# ----------------------------------------------------------------------------- feature stores


def _store_rows(batch: dict, layer: str) -> dict:
    """Feature rows as (id, label, float32 bytes): plain Parquet types, readable without Ray."""
    f = np.ascontiguousarray(batch[f"feat_{layer}"], np.float32)
    return {"id": batch["id"], "label": batch["label"], "feat": np.array([row.tobytes() for row in f], dtype=object)}


def feature_store(loc, ex: Extractor, layer: str, root, *, batch_size: int = 64, min_actors: int = 1,
                  max_actors: int = 1, num_gpus: float = 0.0, device: str | None = None) -> str:
    """Features of every row of ``loc`` as Parquet under ``root`` (content-keyed, reused); its location.

    Written by the Ray Data actor pool; ``index.json``, written last, lists the files,
    so a half-written store is never read.
    """
    import ray

    manifest = read_manifest(loc)
    key = hash_obj({"version": STORE_VERSION, "content_hash": manifest["content_hash"], "rows": manifest["num_rows"],
                    "extractor": ex.tf_name, "weights_sha256": ex.weights_sha256, "layer": layer})[:32]
    store = storage.join(root, f"features-{ex.kind}-{key}")
    index = storage.join(store, "index.json")
    if storage.is_file(index):
        return store
    if not ray.is_initialized():
        raylocal.init_ray()
    labelled = bool(manifest.get("labelled", True) and manifest.get("class_names"))
    groups = len(manifest["class_names"]) if labelled else 1
    ds = read_ray(loc, columns=["id", "image", "label"]).map_batches(
        batch_size=batch_size, batch_format="numpy",
        **raylocal.map_pool_kwargs(
            FeatureActor, dict(ex=ex, layers=[layer], image_size=manifest["image_size"], where=str(loc),
                               thresholds=np.full(groups, MAX_HASH, np.uint64), seed=0, labelled=labelled,
                               device=device),
            rows=manifest["num_rows"], min_size=min_actors, max_size=max_actors, num_gpus=num_gpus),
    ).map_batches(_store_rows, fn_kwargs={"layer": layer}, batch_format="numpy")
    wid = new_write_id()
    fs, path = storage.resolve(storage.join(store, "data", wid))
    try:
        ds.write_parquet(path, filesystem=fs)
    except Exception as e:  # noqa: BLE001 - the DatasetError naming the bad row, when there is one
        from synthaug.evaluate.features import _unwrap

        err = _unwrap(e)
        if err is e:
            raise
        raise err from None
    files = sorted(i.path for i in storage.list_files(storage.join(store, "data", wid)) if i.path.endswith(".parquet"))
    rows = sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files)
    if rows != manifest["num_rows"]:
        raise DatasetError(f"{loc}: feature store has {rows} rows, the manifest says {manifest['num_rows']}")
    EXTRACTED_ROWS[ex.kind] += rows
    rel = [f"data/{wid}/{storage.basename(f)}" for f in files]
    storage.write_json(index, {"files": rel, "rows": rows, "layer": layer, "source": str(loc)})
    return store


def iter_store(store, chunk: int) -> Iterator[Chunk]:
    """Stream a feature store in chunks of at most ``chunk`` rows."""
    index = storage.read_json(storage.join(store, "index.json"))
    fs, _ = storage.resolve(store)
    for rel in index["files"]:
        with fs.open_input_file(storage.resolve(storage.join(store, rel))[1]) as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=chunk, columns=["id", "label", "feat"]):
                feats = b.column("feat").to_pylist()
                vec = np.frombuffer(b"".join(feats), np.float32).reshape(len(feats), -1) if feats else np.zeros((0, 0), np.float32)
                yield b.column("id").to_pylist(), np.asarray(b.column("label"), np.int64), vec


def iter_pixels(loc, chunk: int) -> Iterator[Chunk]:
    """Stream a dataset's images as flattened [-1, 1] pixels ``(n, C*H*W)``, in chunks."""
    for b in iter_batches(loc, columns=["id", "label", "image"], batch_size=chunk):
        if b.num_rows:
            x = to_float(decode_batch(b.column("image").to_pylist(), b.column("id").to_pylist(), str(loc)))  # (n, C, H, W)
            yield b.column("id").to_pylist(), np.asarray(b.column("label"), np.int64), x.reshape(len(x), -1)


def _images_by_id(loc, ids) -> dict:
    """uint8 ``(C, H, W)`` images of a few ids, by streaming the dataset (bounded by ``len(ids)``)."""
    want = pa.array(sorted(set(ids)), pa.string())
    out = {}
    for b in iter_batches(loc, columns=["id", "image"], batch_size=4096):
        t = pa.Table.from_batches([b]).filter(pc.is_in(b.column("id"), value_set=want))
        if t.num_rows:
            out.update(zip(t.column("id").to_pylist(), decode_batch(t.column("image").to_pylist(), t.column("id").to_pylist(), str(loc))))
    return out


# ----------------------------------------------------------------------------- the audit


def _distances(queries: Iterable[Chunk], ref: Callable[[], Iterable[Chunk]], device: str) -> Iterator[tuple]:
    """Per query chunk: (ids, labels, nearest distance, nearest ref id, nearest ref label)."""
    for ids, labels, q in queries:
        d, rid, rlab = nearest_chunked(q, ref(), device)
        yield ids, labels, d, rid, rlab


def _top_k(cur: dict | None, new: dict, k: int) -> dict:
    """The k smallest distances of two candidate sets (ties by synthetic id): deterministic."""
    if cur is not None:
        new = {key: np.concatenate([cur[key], new[key]]) for key in new}
    order = np.lexsort((new["syn_id"].astype(str), new["dist"]))[:k]
    return {key: v[order] for key, v in new.items()}


def near_copy_audit(
    train_dir,
    val_dir,
    synth_dir,
    extractor: Extractor | str,
    percentile: float = 5.0,
    *,
    pixel: bool = True,
    top_k: int = 16,
    layer: str | None = None,
    chunk: int = 4096,
    batch_size: int = 64,
    cache_dir=None,
    min_actors: int = 1,
    max_actors: int = 1,
    num_gpus: float = 0.0,
    device: str | None = None,
) -> dict:
    """Share of synthetic images closer to a train image than real val images get.

    ``extractor`` is a resolved :class:`Extractor` or an in-domain classifier location;
    ``layer`` defaults to its FID layer. Feature stores go under ``cache_dir`` (any
    location; reused by content) or, with ``None``, a temporary local directory -- which
    only works on a single node: on a multi-node cluster give shared storage or a URI, as
    the evaluate stage does (``<work_dir>/cache/features``). Returns scalar keys
    near_copy_share, near_copy_threshold, pixel_near_copy_share, pixel_threshold,
    percentile, n_train, n_val, n_synthetic, feature_dim; ``per_class`` (class name ->
    {n_synthetic, near_copy_share, pixel_near_copy_share}, by the synthetic label); and
    ``pairs``: the ``top_k`` closest synthetic/train :class:`Pair` s, closest first.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    ms, shapes = _check_sets({"train": train_dir, "val": val_dir, "synthetic": synth_dir}, pixel)
    ex = extractor if isinstance(extractor, Extractor) else resolve_extractor("in-domain", extractor)
    layer = layer or ex.layers["fid"]
    dev = _device(device)
    class_names = list(ms["train"]["class_names"])
    tmp = None if cache_dir is not None else tempfile.mkdtemp(prefix="synthaug-audit-")
    root = cache_dir if cache_dir is not None else tmp
    try:
        kw = dict(batch_size=batch_size, min_actors=min_actors, max_actors=max_actors, num_gpus=num_gpus, device=device)
        stores = {n: feature_store(loc, ex, layer, root, **kw)
                  for n, loc in (("train", train_dir), ("val", val_dir), ("synthetic", synth_dir))}
        feat = _feature_audit(stores, chunk, dev, percentile, len(class_names), top_k)
        p_threshold, p_copies = (_pixel_audit(train_dir, val_dir, synth_dir, shapes["train"], chunk, dev, percentile,
                                              len(class_names)) if pixel else (float("nan"), None))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    n_cls, copies = feat["n_cls"], feat["copies"]
    n_syn = int(n_cls.sum())
    return {
        "near_copy_share": float(copies.sum() / n_syn),
        "near_copy_threshold": feat["threshold"],
        "pixel_near_copy_share": float(p_copies.sum() / n_syn) if pixel else float("nan"),
        "pixel_threshold": p_threshold,
        "percentile": float(percentile),
        "n_train": int(ms["train"]["num_rows"]),
        "n_val": int(ms["val"]["num_rows"]),
        "n_synthetic": n_syn,
        "feature_dim": int(feat["dim"]),
        "per_class": _per_class_shares(class_names, n_cls, copies, p_copies if pixel else None),
        "pairs": _closest_pairs(feat["top"], synth_dir, train_dir, pixel),
    }


def _per_class_shares(class_names: list[str], n_cls: np.ndarray, copies: np.ndarray, p_copies) -> dict:
    """class name -> {n_synthetic, near_copy_share, pixel_near_copy_share} (NaN without pixels or images)."""
    return {
        name: {
            "n_synthetic": int(n_cls[i]),
            "near_copy_share": float(copies[i] / n_cls[i]) if n_cls[i] else float("nan"),
            "pixel_near_copy_share": float(p_copies[i] / n_cls[i]) if n_cls[i] and p_copies is not None else float("nan"),
        }
        for i, name in enumerate(class_names)
    }


def _check_sets(locs: dict, pixel: bool) -> tuple[dict, dict]:
    """The three sets' manifests and ``(C, H, W)`` shapes, checked before any work: none empty, one shape for pixels."""
    ms = {}
    for name, loc in locs.items():
        ms[name] = read_manifest(loc)
        if ms[name]["num_rows"] == 0:
            raise DatasetError(f"{loc}: empty dataset (0 rows); nothing to audit")
    shapes = {n: (int(m["channels"]), *m["image_size"]) for n, m in ms.items()}
    if pixel and len(set(shapes.values())) > 1:
        raise DatasetError(
            f"pixel-space audit needs one image shape: train {locs['train']} {shapes['train']}, "
            f"val {locs['val']} {shapes['val']}, synthetic {locs['synthetic']} {shapes['synthetic']}; pass pixel=False"
        )
    return ms, shapes


def _feature_audit(stores: dict, chunk: int, dev: str, percentile: float, k: int, top_k: int) -> dict:
    """Feature space: the threshold from val -> train, then synthetic -> train.

    Returns ``threshold``, per-class synthetic counts ``n_cls`` and near copies ``copies``,
    the ``top`` closest candidates (:func:`_top_k`) and the feature ``dim``.
    """
    train_feats = lambda: iter_store(stores["train"], chunk)  # noqa: E731
    d_val = np.concatenate([d for *_, d, _, _ in _distances(iter_store(stores["val"], chunk), train_feats, dev)])
    threshold = float(np.percentile(d_val, percentile))
    n_cls, copies = np.zeros(k, np.int64), np.zeros(k, np.int64)
    top = None
    for ids, labels, d, rid, rlab in _distances(iter_store(stores["synthetic"], chunk), train_feats, dev):
        np.add.at(n_cls, labels, 1)
        np.add.at(copies, labels[d <= threshold], 1)
        top = _top_k(top, {"dist": d, "syn_id": np.asarray(ids, dtype=object), "syn_label": labels,
                           "train_id": rid, "train_label": rlab}, top_k)
    dim = next((f.shape[1] for *_, f in iter_store(stores["train"], 1)), 0)
    return {"threshold": threshold, "n_cls": n_cls, "copies": copies, "top": top, "dim": dim}


def _pixel_audit(train_dir, val_dir, synth_dir, shape, chunk: int, dev: str, percentile: float,
                 k: int) -> tuple[float, np.ndarray]:
    """Pixel space, the same recipe on flattened [-1, 1] pixels: (threshold, near copies per class)."""
    c, h, w = shape
    prow = max(1, min(chunk, PIXEL_CHUNK_BYTES // (4 * c * h * w)))
    train_px = lambda: iter_pixels(train_dir, prow)  # noqa: E731
    p_val = np.concatenate([d for *_, d, _, _ in _distances(iter_pixels(val_dir, prow), train_px, dev)])
    p_threshold = float(np.percentile(p_val, percentile))
    p_copies = np.zeros(k, np.int64)
    for _, labels, d, _, _ in _distances(iter_pixels(synth_dir, prow), train_px, dev):
        np.add.at(p_copies, labels[d <= p_threshold], 1)
    return p_threshold, p_copies


def _closest_pairs(top: dict, synth_dir, train_dir, pixel: bool) -> list[Pair]:
    """The closest synthetic/train pairs, closest first: fetch only their images."""
    syn_img = _images_by_id(synth_dir, list(top["syn_id"]))
    tr_img = _images_by_id(train_dir, list(top["train_id"]))
    pairs = []
    for j in range(len(top["dist"])):
        a, b = syn_img[top["syn_id"][j]], tr_img[top["train_id"][j]]
        pd = float(np.linalg.norm(to_float(a[None]) - to_float(b[None]))) if pixel else float("nan")
        pairs.append(Pair(str(top["syn_id"][j]), str(top["train_id"][j]), float(top["dist"][j]), pd,
                          int(top["syn_label"][j]), int(top["train_label"][j]), a, b))
    return pairs


def save_pairs_grid(pairs: list[Pair], path, per_row: int = 8) -> str:
    """A PNG of the closest pairs: synthetic on top, its nearest train image below, distance in the title."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if not pairs:
        raise ValueError("save_pairs_grid: no pairs to draw")
    cols = min(per_row, len(pairs))
    blocks = -(-len(pairs) // cols)
    fig = Figure(figsize=(1.4 * cols, 3.0 * blocks))
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, p in enumerate(pairs):
        r, c = 2 * (j // cols), j % cols
        for row, img, title in ((r, p.synthetic_image, f"syn d={p.distance:.2f}"), (r + 1, p.train_image, f"train {p.train_id}")):
            hwc = np.asarray(img).transpose(1, 2, 0)  # (H, W, C)
            ax = axes[row, c]
            ax.imshow(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(title, fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return storage.write_bytes(path, buf.getvalue())
