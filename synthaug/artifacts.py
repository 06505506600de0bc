"""The dataset contract: Parquet shards plus a ``manifest.json`` that lists them, written last.

Layout of a contract dataset at any location (local path, shared mount, ``s3://...``)::

    <dataset>/
      data/<write id>/<shard>.parquet   rows: id, image (PNG bytes), label, class_name, source, [provenance];
                                        Hugging Face datasets features in the schema metadata
      manifest.json                     the commit record: lists the shards (path, rows, bytes), written last

The manifest *is* the commit, because object stores have no rename: readers read only
the shards it lists, so stray shards of a failed or retried write are never read, and a
location without a manifest is incomplete. Each write goes to a fresh write id under
``data/``; a new manifest replaces an old one in one atomic write, and only then are
the other write ids' shards deleted, so an earlier output is never left half-overwritten.

The manifest's figures come from per-shard statistics computed where the rows are
(inside the Ray tasks that write or read them), summed in the driver: row counts,
counts per class, label range and an order- and sharding-independent content hash
(the per-lane sum, mod 2**64, of every row's sha256 of (id, label, sha256(image))).
Id uniqueness is a Ray Data aggregation over the id column. No function here reads a
whole dataset into one process except :func:`read_table`, for bounded data only.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthaug import storage
from synthaug.errors import InputError
from synthaug.storage import json_default  # noqa: F401  (re-exported: manifests' JSON encoder)

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
DATA_DIR = "data"
BASE_COLUMNS = ("id", "image", "label", "class_name", "source")
BASE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("label", pa.int64()),
    ("class_name", pa.string()),
    ("source", pa.string()),
])
PROVENANCE_COLUMNS = ("generator", "seed", "guidance_scale", "sampler", "steps")
UNLABELLED = -1  # label of rows in an unlabelled pool
LANES = 4  # uint64 lanes of the content hash (256 bits)


class DatasetError(InputError, ValueError):
    """A dataset is missing, incomplete or breaks the contract; names the location, row or key."""


# ----------------------------------------------------------------------------- files


def atomic_write_text(path: str | Path, text: str) -> str:
    """Write ``text`` to a location atomically (temporary file + rename, or one object PUT)."""
    return storage.write_text(path, text)


def atomic_write_json(path: str | Path, obj: Any) -> str:
    return storage.write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def staging_dir(final: str | Path) -> Path:
    """A fresh temporary sibling of a *local* ``final`` to build a tree in (see :func:`publish_tree`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move a finished local staging directory into place, replacing ``final`` only at the end."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish_tree(local_tmp: str | Path, location: str | Path, manifest: dict | None = None) -> str:
    """Publish a finished local tree (a generator, a classifier) at ``location``, manifest last.

    Local: the tree is renamed into place (an earlier tree stays until then). Object
    store: the earlier manifest is removed first (so a half-replaced tree is never read),
    the files are uploaded, and the manifest is written last.
    """
    local_tmp = Path(local_tmp)
    lp = storage.local_path(location)
    if lp is not None:
        if manifest is not None:
            atomic_write_json(local_tmp / MANIFEST, manifest)
        commit_dir(local_tmp, lp)
        return str(lp)
    storage.delete(storage.join(location, MANIFEST))
    storage.delete(location)
    storage.upload_dir(local_tmp, location, skip=(MANIFEST,))
    if manifest is None and (local_tmp / MANIFEST).is_file():
        manifest = json.loads((local_tmp / MANIFEST).read_text())
    if manifest is not None:
        atomic_write_json(storage.join(location, MANIFEST), manifest)
    shutil.rmtree(local_tmp, ignore_errors=True)
    return str(location)


# ----------------------------------------------------------------------------- hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file at any location."""
    lp = storage.local_path(path)
    h = hashlib.sha256()
    if lp is not None:
        with open(lp, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    else:
        h.update(storage.read_bytes(path))
    return h.hexdigest()


def hash_tree(path: str | Path, skip: Iterable[str] = (MANIFEST,)) -> str:
    """Content hash of every file under a location (relative names + bytes), skipping ``skip``."""
    skip = set(skip)
    fs, root = storage.resolve(path)
    h = hashlib.sha256()
    for info in storage.list_files(path):
        rel = info.path[len(root):].lstrip("/").replace(os.sep, "/")
        if posixpath.basename(rel) in skip:
            continue
        h.update(rel.encode())
        with fs.open_input_stream(info.path) as f:
            fh = hashlib.sha256()
            while block := f.read(1 << 20):
                fh.update(block)
        h.update(fh.hexdigest().encode())
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """Stable hash of a JSON-able object (configs, plans)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=json_default).encode())


def row_digests(ids: Iterable[str], labels: Iterable[int], images: Iterable[bytes]) -> np.ndarray:
    """Per row, sha256(id, label, sha256(image)) as ``(N, LANES)`` uint64."""
    out = []
    for i, y, im in zip(ids, labels, images):
        h = hashlib.sha256()
        h.update(str(i).encode())
        h.update(b"\0" + str(int(y)).encode() + b"\0")
        h.update(hashlib.sha256(im).digest())
        out.append(h.digest())
    if not out:
        return np.zeros((0, LANES), np.uint64)
    return np.frombuffer(b"".join(out), dtype="<u8").reshape(-1, LANES)


def lanes_hex(lanes: Iterable[int]) -> str:
    return "".join(f"{int(v) % (1 << 64):016x}" for v in lanes)


def table_content_hash(table: pa.Table) -> str:
    """The content hash of rows (id, label, image): independent of row order and sharding."""
    d = row_digests(table.column("id").to_pylist(), table.column("label").to_pylist(), table.column("image").to_pylist())
    return lanes_hex(d.sum(axis=0, dtype=np.uint64))


# ----------------------------------------------------------------------------- shard statistics


def batch_stats(batch: dict | pa.Table, num_classes: int) -> dict:
    """The manifest figures of one batch of rows (summed over batches by :func:`merge_stats`)."""
    if isinstance(batch, pa.Table):
        batch = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in ("id", "label", "image")}
    ids, labels, images = batch["id"], np.asarray(batch["label"], dtype=np.int64), batch["image"]
    d = row_digests(ids, labels, images)
    counts = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    return {
        "rows": int(len(labels)),
        "counts": [int(c) for c in counts],
        "label_min": int(labels.min()) if len(labels) else 0,
        "label_max": int(labels.max()) if len(labels) else 0,
        "bad_label_id": str(ids[int(bad[0])]) if bad.size else "",
        "bad_label": int(labels[int(bad[0])]) if bad.size else 0,
        "lanes": [int(v) for v in d.sum(axis=0, dtype=np.uint64)],
    }


def merge_stats(stats: Iterable[dict], num_classes: int) -> dict:
    """Sum per-shard (or per-batch) statistics."""
    total = {"rows": 0, "counts": [0] * num_classes, "label_min": None, "label_max": None, "bad_label_id": "",
             "bad_label": 0, "lanes": [0] * LANES}
    for s in stats:
        if not s["rows"]:
            continue
        total["rows"] += int(s["rows"])
        total["counts"] = [a + int(b) for a, b in zip(total["counts"], s["counts"])]
        total["label_min"] = s["label_min"] if total["label_min"] is None else min(total["label_min"], s["label_min"])
        total["label_max"] = s["label_max"] if total["label_max"] is None else max(total["label_max"], s["label_max"])
        if s.get("bad_label_id") and not total["bad_label_id"]:
            total["bad_label_id"], total["bad_label"] = s["bad_label_id"], s["bad_label"]
        total["lanes"] = [(a + int(b)) % (1 << 64) for a, b in zip(total["lanes"], s["lanes"])]
    return total


def new_write_id() -> str:
    """A fresh, sortable name for one write attempt's shard directory."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def write_shard(dataset: str | Path, write_id: str, name: str, table: pa.Table, class_names: Sequence[str],
                image_encoding: str = "png") -> dict:
    """Write one shard atomically under ``dataset/data/<write_id>/<name>.parquet``; its manifest entry.

    Called inside Ray tasks. A retried task writes the same name again, so retries never
    leave two copies of its rows. The file carries :func:`with_hf_features`' metadata.
    """
    rel = f"{DATA_DIR}/{write_id}/{name}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(with_hf_features(table, class_names, image_encoding), sink)
    buf = sink.getvalue().to_pybytes()
    storage.write_bytes(storage.join(dataset, rel), buf)
    return {"path": rel, "bytes": len(buf), **batch_stats(table, len(class_names))}


# ----------------------------------------------------------------------------- Hugging Face features

_HF_FLOATS = {"halffloat": "float16", "float": "float32", "double": "float64"}


def _hf_value(t: pa.DataType) -> dict | None:
    """A ``datasets.Value`` of a primitive Arrow type, or None (``datasets`` then infers the column's type)."""
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t) or t in (
            pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
        return {"dtype": _HF_FLOATS.get(str(t), str(t)), "_type": "Value"}
    return None


def hf_features(schema: pa.Schema, class_names: Sequence[str], image_encoding: str = "png") -> dict:
    """The Hugging Face ``datasets`` features of a contract schema, as ``Features.to_dict()`` writes them.

    ``image`` is an ``Image`` when it holds PNG bytes (its storage stays plain binary:
    ``datasets.Image.cast_storage`` accepts it), ``label`` is a ``ClassLabel`` of ``class_names`` (an unlabelled pool's
    -1 is ``datasets``' own "no label"), other primitive columns are ``Value``; columns of
    other types are left out, and ``datasets`` infers them from the Arrow type.
    """
    out = {}
    for f in schema:
        if f.name == "image" and image_encoding == "png" and pa.types.is_binary(f.type):
            out[f.name] = {"_type": "Image"}
        elif f.name == "label" and class_names and pa.types.is_integer(f.type):
            out[f.name] = {"names": [str(c) for c in class_names], "_type": "ClassLabel"}
        elif (v := _hf_value(f.type)) is not None:
            out[f.name] = v
    return out


def with_hf_features(table: pa.Table, class_names: Sequence[str], image_encoding: str = "png") -> pa.Table:
    """``table`` with :func:`hf_features` as its ``huggingface`` schema metadata (the columns are untouched)."""
    meta = dict(table.schema.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": hf_features(table.schema, class_names, image_encoding)}})
    return table.replace_schema_metadata(meta)


# ----------------------------------------------------------------------------- validation


def validate_table(table: pa.Table, class_names: list[str], where: str, labelled: bool = True) -> None:
    """Check an in-memory table's columns, id uniqueness and label range; raise naming the row."""
    missing = [c for c in BASE_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: missing column(s) {missing}; the contract needs {list(BASE_COLUMNS)}")
    ids = table.column("id")
    if pa.compute.count_distinct(ids).as_py() != len(ids):
        counts = pa.compute.value_counts(ids)
        dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise DatasetError(f"{where}: duplicate id {dup!r}")
    if labelled:
        labels = table.column("label")
        bad = pa.compute.or_(pa.compute.less(labels, 0), pa.compute.greater_equal(labels, len(class_names)))
        idx = pa.compute.index(bad, True).as_py()
        if idx >= 0:
            raise DatasetError(f"{where}: row {idx} (id {ids[idx].as_py()!r}) has label {labels[idx].as_py()} "
                               f"outside [0, {len(class_names)})")


def id_hashes(ids) -> np.ndarray:
    """uint64 hashes of ids (pandas' vectorised hash)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)


def _bucket_hashes(fs, paths: list[str], buckets: int) -> list[np.ndarray] | np.ndarray:
    """Phase 1 of the id check: the id hashes of some shards, split into ``buckets`` by value."""
    hs = [id_hashes(pq.read_table(p, columns=["id"], filesystem=fs).column("id").to_pylist()) for p in paths]
    h = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
    b = h % np.uint64(buckets)
    out = [np.sort(h[b == k]) for k in range(buckets)]
    return out[0] if buckets == 1 else out  # one return value per bucket (Ray's num_returns)


def _first_duplicate(*arrays: np.ndarray) -> int | None:
    """Phase 2: one bucket's hashes from every shard group; a hash that occurs twice, or None."""
    h = np.sort(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint64)
    same = np.flatnonzero(h[1:] == h[:-1])
    return int(h[same[0]]) if same.size else None


ROWS_PER_ID_BUCKET = 2_000_000  # 16 MB of hashes per phase-2 task


def duplicate_id(dataset: str | Path, shards: list[dict]) -> str | None:
    """An id that occurs twice in the listed shards, or None.

    A two-phase exchange of 64-bit id hashes over plain Ray tasks: each task hashes the
    ids of a group of shards and splits them into buckets by value; one task per bucket
    looks for a repeated hash; a hit is confirmed by string. Memory per process is
    bounded by ``ROWS_PER_ID_BUCKET`` hashes however large the dataset. (Ray Data's
    ``groupby("id").count()`` does the same with a fixed cost of ~10 s per call measured
    here, which a four-split ingest would pay four times.)
    """
    import ray

    n = sum(int(s["rows"]) for s in shards)
    if n == 0:
        return None
    fs, _ = storage.resolve(dataset)
    paths = [storage.resolve(storage.join(dataset, s["path"]))[1] for s in shards]
    buckets = max(1, -(-n // ROWS_PER_ID_BUCKET))
    groups = [paths[i::max(1, min(len(paths), 64))] for i in range(max(1, min(len(paths), 64)))]
    phase1 = ray.remote(_bucket_hashes).options(num_returns=buckets, num_cpus=0.5)
    parts = [phase1.remote(fs, g, buckets) for g in groups]
    parts = [[p] if buckets == 1 else p for p in parts]
    phase2 = ray.remote(_first_duplicate).options(num_cpus=0.5)
    hits = ray.get([phase2.remote(*[p[k] for p in parts]) for k in range(buckets)])
    for hit in (h for h in hits if h is not None):
        seen: set[str] = set()
        for p in paths:  # error path only: find the string behind the repeated hash
            ids = pq.read_table(p, columns=["id"], filesystem=fs).column("id").to_pylist()
            for i, hv in zip(ids, id_hashes(ids)):
                if int(hv) == hit:
                    if i in seen:
                        return i
                    seen.add(i)
    return None


# ----------------------------------------------------------------------------- commit


def commit_dataset(
    dataset: str | Path,
    shards: list[dict],
    *,
    class_names: list[str],
    image_size: tuple[int, int],
    channels: int,
    config: dict,
    labelled: bool = True,
    extra: dict | None = None,
    check_ids: bool = True,
    columns: list[str] | None = None,
) -> dict:
    """Validate the shards' figures, write the manifest last, then drop other write ids' shards."""
    where = str(dataset)
    total = merge_stats(shards, len(class_names))
    if labelled and total["bad_label_id"]:
        raise DatasetError(f"{where}: id {total['bad_label_id']!r} has label {total['bad_label']} outside "
                           f"[0, {len(class_names)})")
    if check_ids:
        dup = duplicate_id(dataset, shards)
        if dup is not None:
            raise DatasetError(f"{where}: duplicate id {dup!r}")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_rows": total["rows"],
        "class_names": list(class_names),
        "counts": {name: int(n) for name, n in zip(class_names, total["counts"])},
        "labelled": labelled,
        "image_size": list(image_size),
        "channels": int(channels),
        "image_encoding": "png",
        "columns": list(columns or BASE_COLUMNS),
        "content_hash": lanes_hex(total["lanes"]),
        "shards": [{"path": s["path"], "rows": int(s["rows"]), "bytes": int(s["bytes"]), **_majority(s)} for s in shards],
        "config": config,
        **(extra or {}),
    }
    atomic_write_json(storage.join(dataset, MANIFEST), manifest)
    _drop_unlisted(dataset, manifest)
    return manifest


def _majority(shard: dict) -> dict:
    """A shard's most frequent class and its rows (``synthaug.shuffle.blocked_shards`` checks the layout with it)."""
    counts = shard.get("counts")
    if not counts or not shard.get("rows"):
        return {}
    c = int(np.argmax(counts))
    return {"majority": [c, int(counts[c])]}


def _drop_unlisted(dataset: str | Path, manifest: dict) -> None:
    """Delete write-id directories the manifest does not list (failed or superseded writes)."""
    keep = {s["path"].split("/")[1] for s in manifest["shards"] if s["path"].count("/") >= 2}
    for d in storage.list_dirs(storage.join(dataset, DATA_DIR)):
        if d not in keep:
            storage.delete(storage.join(dataset, DATA_DIR, d))


def write_dataset(data: pa.Table | Any, path: str | Path, **manifest_kwargs: Any) -> dict:
    """Write a contract dataset; ``data`` is a pyarrow Table (small) or a Ray Dataset.

    A Ray Dataset is written by Ray Data's Parquet writer into a fresh write id; the
    shards' figures are then computed by Ray Data tasks over those files.
    """
    names = list(manifest_kwargs["class_names"])
    n_classes = len(names)
    wid = new_write_id()
    encoding = (manifest_kwargs.get("extra") or {}).get("image_encoding", "png")
    if isinstance(data, pa.Table):
        labelled = manifest_kwargs.get("labelled", True)
        validate_table(data, names, str(path), labelled=labelled)
        shard = write_shard(path, wid, "part-00000", data, names, encoding)
        manifest_kwargs.setdefault("columns", data.column_names)
        return commit_dataset(path, [shard], check_ids=False, **manifest_kwargs)
    fs, root = storage.resolve(storage.join(path, DATA_DIR, wid))
    # Each block carries the features metadata, which Ray's writer keeps (the first block's schema
    # metadata); batch_size=None maps whole blocks, so the files' layout is unchanged.
    data = data.map_batches(with_hf_features, fn_kwargs={"class_names": names, "image_encoding": encoding},
                            batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    # Rows reach the files in the dataset's order, whatever order its tasks or actors finish in:
    # readers (a classifier's file order + shuffle buffer) then see the same layout every run.
    data.context.execution_options.preserve_order = True
    data.write_parquet(root, filesystem=fs)
    shards = shard_stats(path, [posixpath.join(DATA_DIR, wid, posixpath.basename(i.path))
                                for i in storage.list_files(storage.join(path, DATA_DIR, wid))], n_classes)
    manifest_kwargs.setdefault("columns", _written_columns(path, shards))
    return commit_dataset(path, shards, **manifest_kwargs)


def _written_columns(path: str | Path, shards: list[dict]) -> list[str]:
    """The columns of the shards just written (their first file's schema: no second execution of the
    dataset, which ``Dataset.schema()`` would start); the base columns when no row was written."""
    if not shards:
        return list(BASE_COLUMNS)
    fs, loc = storage.resolve(storage.join(path, shards[0]["path"]))
    return list(pq.read_schema(loc, filesystem=fs).names)


def shard_stats(dataset: str | Path, rel_paths: list[str], num_classes: int) -> list[dict]:
    """Manifest entries of existing shard files, with figures computed by Ray Data tasks."""
    import ray.data

    fs, root = storage.resolve(dataset)
    entries = {rel: {"path": rel, "bytes": int(storage.info(storage.join(dataset, rel)).size)} for rel in rel_paths}
    if not rel_paths:
        return []
    full = {storage.resolve(storage.join(dataset, rel))[1]: rel for rel in rel_paths}
    ds = ray.data.read_parquet(list(full), filesystem=fs, include_paths=True).select_columns(["id", "label", "image", "path"])
    per_file: dict[str, list[dict]] = {rel: [] for rel in rel_paths}
    # One stats row per batch of one file (batches never cross files: map_batches keeps
    # the read's blocks, and each block comes from one file).
    for row in ds.map_batches(_per_file_batches, fn_kwargs={"num_classes": num_classes}, batch_format="numpy").iter_rows():
        per_file[full.get(row["path"], row["path"])].append(json.loads(row["stats"]))
    return [{**entries[rel], **merge_stats(per_file[rel], num_classes)} for rel in rel_paths]


def _per_file_batches(batch: dict, num_classes: int) -> dict:
    """Stats per distinct file path within a batch."""
    paths = np.asarray(batch["path"])
    out_p, out_s = [], []
    for p in np.unique(paths):
        m = paths == p
        out_p.append(str(p))
        out_s.append(json.dumps(batch_stats({k: np.asarray(batch[k])[m] for k in ("id", "label", "image")}, num_classes)))
    return {"path": np.asarray(out_p, dtype=object), "stats": np.asarray(out_s, dtype=object)}


# ----------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete dataset (or generator) location; incomplete ones raise."""
    m = storage.join(path, MANIFEST)
    if not storage.exists(path):
        raise DatasetError(f"{path}: no such directory")
    if not storage.is_file(m):
        raise DatasetError(f"{path}: no {MANIFEST}, so the directory is incomplete and is not read")
    try:
        manifest = json.loads(storage.read_text(m))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{m}: unreadable manifest ({e})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{m}: schema_version {version!r}, this synthaug reads {SCHEMA_VERSION}")
    return manifest


def shard_paths(path: str | Path, manifest: dict | None = None, check: bool = True) -> list[str]:
    """Filesystem paths (for ``storage.resolve(path)[0]``) of the shards a manifest lists."""
    manifest = manifest or read_manifest(path)
    if "shards" not in manifest:
        raise DatasetError(f"{path}: manifest lists no shards (not a dataset manifest)")
    fs, root = storage.resolve(path)
    paths = [storage.resolve(storage.join(path, s["path"]))[1] for s in manifest["shards"]]
    if check and paths:
        present = {i.path for i in storage.list_files(storage.join(path, DATA_DIR))}
        for s, p in zip(manifest["shards"], paths):
            if p not in present:
                raise DatasetError(f"{path}: the manifest lists shard {s['path']}, which is missing")
    return paths


def _empty_table(columns: list[str] | None, manifest: dict) -> pa.Table:
    schema = BASE_SCHEMA
    names = columns or [n for n in manifest.get("columns", BASE_COLUMNS) if n in schema.names]
    return pa.table({n: pa.array([], schema.field(n).type) for n in names if n in schema.names})


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a complete contract dataset into memory: for bounded data only (tests, capped subsets)."""
    manifest = read_manifest(path)
    paths = shard_paths(path, manifest)
    if not paths:
        return _empty_table(columns, manifest)
    fs, _ = storage.resolve(path)
    return pq.ParquetDataset(paths, filesystem=fs).read(columns=columns)


def iter_batches(path: str | Path, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream a dataset's rows in this process, shard by shard, in manifest order."""
    manifest = read_manifest(path)
    fs, _ = storage.resolve(path)
    for p in shard_paths(path, manifest):
        with fs.open_input_file(p) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def read_ray(path: str | Path, columns: list[str] | None = None, **kwargs: Any):
    """A complete contract dataset as a Ray Dataset over the shards its manifest lists."""
    import ray.data

    manifest = read_manifest(path)
    paths = shard_paths(path, manifest)
    if not paths:
        return ray.data.from_arrow(_empty_table(columns, manifest))
    fs, _ = storage.resolve(path)
    ds = ray.data.read_parquet(paths, filesystem=fs, **kwargs)
    return ds.select_columns(list(columns)) if columns else ds


def is_complete(path: str | Path) -> bool:
    """True when a location holds a manifest (a finished dataset or export)."""
    return storage.is_file(storage.join(path, MANIFEST))

