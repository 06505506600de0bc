"""Image-to-image sources (``sample.init: real``): which real image each sample starts from.

Sample i of class c starts from the class's real image at position i mod n_c, in an order
seeded by (seed, id): a function of (seed, label, i) and the real set's content only, never
of pool size, chunking or retries, and every real image gets the same number of variants
(up to one). The driver builds :func:`source_index`, one small (label, id, shard) row per
real image read from the shards' ``id`` and ``label`` columns; each sampling chunk reads
only its own sources' images from their shards (:func:`read_sources`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthaug import storage
from synthaug.artifacts import DatasetError, read_manifest, shard_paths
from synthaug.config import SampleConfig
from synthaug.keys import row_keys


def source_order_key(seed: int, ids) -> np.ndarray:
    """The seeded order of source rows within a class: ``keys.row_keys`` of (seed, id)."""
    return row_keys(ids, seed, "source")


def source_index(location: str, seed: int) -> pa.Table:
    """The (label, id, shard) index of a real set, sorted by label, then by the seeded key (then id).

    One small row per real image, read from the shards' ``id`` and ``label`` columns only
    (never the images); the bounded "ids of a plan" a driver may hold.
    """
    fs, _ = storage.resolve(location)
    parts = []
    for p in shard_paths(location):
        t = pq.read_table(p, columns=["id", "label"], filesystem=fs)
        parts.append(t.append_column("shard", pa.array([p] * t.num_rows, pa.string())))
    if not parts:
        return pa.table({"label": pa.array([], pa.int64()), "id": pa.array([], pa.string()),
                         "shard": pa.array([], pa.string())})
    t = pa.concat_tables(parts).combine_chunks()
    t = t.append_column("key", pa.array(source_order_key(seed, t.column("id").to_pylist()), pa.uint64()))
    t = t.sort_by([("label", "ascending"), ("key", "ascending"), ("id", "ascending")])
    return t.select(["label", "id", "shard"]).cast(pa.schema([("label", pa.int64()), ("id", pa.string()),
                                                              ("shard", pa.string())]))


def source_rows(index: pa.Table, label: int, start: int, stop: int) -> tuple[list[str], list[str]]:
    """The (ids, shards) of the sources of images ``[start, stop)`` of class ``label``: position i mod n_c."""
    labels = index.column("label").to_numpy()
    lo, hi = np.searchsorted(labels, label, "left"), np.searchsorted(labels, label, "right")
    n = int(hi - lo)
    if n == 0:
        raise DatasetError(f"init 'real': the real set has no image of class {label}")
    rows = [int(lo) + i % n for i in range(int(start), int(stop))]
    ids, shards = index.column("id"), index.column("shard")
    return [ids[j].as_py() for j in rows], [shards[j].as_py() for j in rows]


def read_sources(fs, ids: list[str], shards: list[str]) -> list[bytes]:
    """The PNG bytes of the rows ``ids`` (in that order; repeats allowed), one filtered read per shard."""
    want: dict[str, set[str]] = {}
    for i, sh in zip(ids, shards):
        want.setdefault(sh, set()).add(i)
    found: dict[str, bytes] = {}
    for sh, need in want.items():
        t = pq.read_table(sh, columns=["id", "image"], filters=[("id", "in", sorted(need))], filesystem=fs)
        found.update(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))
    missing = [i for i in ids if i not in found]
    if missing:
        raise DatasetError(f"init 'real': source row {missing[0]!r} is not in its shard any more; the real set changed")
    return [found[i] for i in ids]


def check_source(source: str, gen_manifest: dict, counts: dict[str, int]) -> dict:
    """The real set's manifest, checked against the generator: classes, image shape, a source per sampled class."""
    m = read_manifest(source)
    shard_paths(source, m)  # every listed shard is there
    if list(m["class_names"]) != list(gen_manifest["class_names"]):
        raise DatasetError(f"config key 'sample.source': {source} has classes {m['class_names']}, the generator "
                           f"{gen_manifest['class_names']}")
    size, channels = int(gen_manifest["image_size"]), int(gen_manifest["channels"])
    if list(m["image_size"]) != [size, size] or int(m["channels"]) != channels:
        raise DatasetError(f"config key 'sample.source': {source} holds {m['image_size']} x {m['channels']}-channel "
                           f"images, the generator makes {[size, size]} x {channels}")
    empty = [c for c, n in counts.items() if n and not m["counts"].get(c)]
    if empty:
        raise DatasetError(f"config key 'sample.source': {source} has no image of class {empty[0]!r} to start from")
    return m


def resolve_source(s: SampleConfig, source_dir: str | None = None) -> str | None:
    """The real set image-to-image starts from (``source_dir``, else ``sample.source``); None for init 'noise'."""
    if s.init != "real":
        return None
    loc = source_dir or s.source
    if not loc:
        raise DatasetError("config key 'sample.source': init 'real' needs a real contract dataset to start from "
                           "(the pipeline passes the run's train split)")
    return storage.absolute(str(loc))
