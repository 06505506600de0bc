"""Ingest sources: list in the driver (paths and metadata only), read in Ray tasks.

Each source has three parts:

- a *listing* (driver): paths and labels, or Parquet row groups, packed into *chunk
  descriptors*, one-row Arrow tables whose list columns name one chunk's items. Nothing
  is decoded; the driver holds O(items) compact strings and does O(chunks) Python work
  beyond listing the files.
- ``chunk_labels`` (task): the ids and labels of one chunk, for the split pre-pass. For
  image folders and digits they come from the descriptor; for Parquet only the label
  column of the chunk's row groups is read.
- ``chunk_images`` (task): one chunk's ``(id, label, where, PIL image)``, fully decoded;
  an unreadable or truncated image raises :class:`DatasetError` naming ``where`` (the
  file, or ``file row N`` for Parquet).

Ids: ``digits-NNNN``; ``<class>/<path below the class folder>`` for image folders; ``<stem>-NNNNNNN`` for
Parquet, where ``stem`` is the file's name without ``.parquet`` (its path relative to the
source directory for a directory source) and ``N`` the row within that file.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from synthaug import storage
from synthaug.artifacts import DatasetError
from synthaug.config import IngestConfig
from synthaug.data.images import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Parquet chunks hold up to this many times ingest.chunk_size rows (whole row groups, in a seeded
# order), dealt out over shards of about chunk_size: a task then holds that many encoded images.
PARQUET_MIX = 8


@dataclass
class Listing:
    """What the driver knows before any image is read."""

    chunks: list[pa.Table]  # one-row chunk descriptors (see module docstring)
    class_names: list[str] | None  # None: Parquet without ingest.class_names (max label + 1 classes)
    num_items: int  # images (digits, folders) or rows (Parquet)
    fingerprint: str = ""  # what the source is: every file's name, size and mtime (digits: the dataset's own)


def _fingerprint(infos) -> str:
    """sha256 over (path, size, mtime) of listed files: a changed, added or removed file changes it."""
    h = hashlib.sha256()
    for i in infos:
        mtime = i.mtime_ns if i.mtime_ns is not None else 0
        h.update(f"{i.path}\0{i.size}\0{mtime}\n".encode())
    return h.hexdigest()


def pack_chunks(items: pa.Table, chunk_of: np.ndarray) -> list[pa.Table]:
    """Group consecutive listing rows into one-row descriptors: ``chunk`` plus one list column per column."""
    if not len(items):
        return []
    starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
    ends = np.r_[starts[1:], len(items)]
    out = []
    for i, (a, b) in enumerate(zip(starts, ends)):
        part = items.slice(int(a), int(b - a))
        cols = {"chunk": pa.array([i], pa.int64())}
        for name in part.column_names:
            values = part.column(name).combine_chunks()
            cols[name] = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
        out.append(pa.table(cols))
    return out


def _mixed(items: pa.Table, cfg: IngestConfig) -> pa.Table:
    """The listing in the writers' seeded order (``shuffle.layout_order``): chunks, and so shards, mix classes."""
    from synthaug.shuffle import layout_order

    return items.take(pa.array(layout_order(items.column("id").to_pylist(), cfg.seed)))


def list_source(cfg: IngestConfig) -> Listing:
    """Check and list ``cfg``'s source in the driver; bad paths, folders and columns raise here."""
    if cfg.source == "digits":
        return _list_digits(cfg)
    if cfg.source == "imagefolder":
        return _list_imagefolder(cfg)
    return _list_parquet(cfg)


def chunk_labels(cfg: IngestConfig, desc: dict) -> tuple[list[str], np.ndarray]:
    """Ids and int64 labels of one chunk (in a task)."""
    if cfg.source == "parquet":
        return _parquet_labels(cfg, desc)
    return list(desc["id"]), np.asarray(desc["label"], dtype=np.int64)


def chunk_images(cfg: IngestConfig, desc: dict) -> Iterator[tuple[str, int, str, Image.Image]]:
    """``(id, label, where, decoded image)`` of one chunk, in listing order (in a task)."""
    if cfg.source == "digits":
        for i, y, px in zip(desc["id"], desc["label"], desc["pixels"]):
            yield i, int(y), i, Image.fromarray(np.frombuffer(px, np.uint8).reshape(8, 8))
    elif cfg.source == "imagefolder":
        fs, root = storage.resolve(cfg.path)
        for i, y in zip(desc["id"], desc["label"]):
            where = storage.join(cfg.path, i)
            try:
                with fs.open_input_stream(posixpath.join(root, i)) as f:
                    data = f.read()
            except OSError as e:
                raise DatasetError(f"{where}: cannot read ({e})") from None
            yield i, int(y), where, open_image(data, where)
    else:
        yield from _parquet_images(cfg, desc)


# ----------------------------------------------------------------------------- digits


def _list_digits(cfg: IngestConfig) -> Listing:
    """scikit-learn's bundled 8x8 digits, scaled from 0..16 to 0..255 (small: built in the driver)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    items = pa.table({
        "id": [f"digits-{i:04d}" for i in range(len(imgs))],
        "label": pa.array(d.target, pa.int64()),
        "pixels": pa.array([im.tobytes() for im in imgs], pa.binary()),
    })
    chunks = pack_chunks(_mixed(items, cfg), np.arange(len(imgs)) // cfg.chunk_size)
    fingerprint = hashlib.sha256(imgs.tobytes() + d.target.astype(np.int64).tobytes()).hexdigest()
    return Listing(chunks, [str(c) for c in d.target_names], len(imgs), fingerprint)


# ----------------------------------------------------------------------------- image folders


def _list_imagefolder(cfg: IngestConfig) -> Listing:
    """``root/<class>/**/<image>``; class names are the sorted folder names. Images in sub-folders of a
    class folder belong to it (as in torchvision's ``ImageFolder``), symlinks followed, loops cut."""
    root = cfg.path
    if not root or not storage.is_dir(root):
        raise DatasetError(f"ingest.path: image folder {root} does not exist")
    classes = storage.list_dirs(root)
    if not classes:
        raise DatasetError(f"{root}: no class folders (expected root/<class>/<image>)")
    if len(classes) < 2:
        raise DatasetError(f"{root}: one class folder ({classes[0]!r}); a classifier needs at least 2 classes")
    parts, fp = [], hashlib.sha256()
    for k, c in enumerate(classes):
        # Images anywhere below the class folder, as torchvision's ImageFolder finds them (one listing).
        base = storage.resolve(storage.join(root, c))[1]
        infos = [i for i in storage.walk_files(storage.join(root, c)) if i.path.lower().endswith(IMAGE_SUFFIXES)]
        names = [i.path[len(base):].lstrip("/") for i in infos]
        fp.update(f"{c}\0{_fingerprint(infos)}\n".encode())
        if not names:
            raise DatasetError(f"{storage.join(root, c)}: empty class folder '{c}' (no .png/.jpg/.jpeg/.webp files)")
        parts.append(pa.table({"id": [f"{c}/{n}" for n in names], "label": pa.array(np.full(len(names), k), pa.int64())}))
    items = _mixed(pa.concat_tables(parts), cfg)
    chunks = pack_chunks(items, np.arange(len(items)) // cfg.chunk_size)
    return Listing(chunks, classes, len(items), fp.hexdigest())


# ----------------------------------------------------------------------------- Parquet


def _parquet_files(path: str) -> list[tuple[str, str]]:
    """``(location, stem)`` of a Parquet file, or of the ``.parquet`` files under a directory."""
    if not path or not storage.exists(path):
        raise DatasetError(f"ingest.path: Parquet source {path} does not exist")
    if storage.is_file(path):
        name = storage.basename(path)
        return [(path, name[: -len(".parquet")] if name.lower().endswith(".parquet") else name.rsplit(".", 1)[0])]
    _, root = storage.resolve(path)
    out = []
    for info in storage.list_files(path):
        rel = info.path[len(root):].lstrip("/")
        if not rel.lower().endswith(".parquet") or any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        out.append((storage.join(path, rel), rel[: -len(".parquet")]))
    if not out:
        raise DatasetError(f"{path}: no .parquet files")
    return out


def _check_schema(loc: str, schema: pa.Schema, cfg: IngestConfig) -> None:
    for key, col in (("ingest.image_column", cfg.image_column), ("ingest.label_column", cfg.label_column)):
        if col not in schema.names:
            raise DatasetError(f"{loc}: no column '{col}' (from {key}); columns are {schema.names}")
    lt = schema.field(cfg.label_column).type
    if not pa.types.is_integer(lt):
        raise DatasetError(f"{loc}: label column '{cfg.label_column}' must hold integers, got {lt}")
    it = schema.field(cfg.image_column).type
    ok = pa.types.is_binary(it) or pa.types.is_large_binary(it) or (
        pa.types.is_struct(it) and it.get_field_index("bytes") >= 0)
    if not ok:
        raise DatasetError(f"{loc}: column '{cfg.image_column}' holds {it}, not image bytes (or {{'bytes': ...}} structs)")


def _list_parquet(cfg: IngestConfig) -> Listing:
    """Files and row groups from the footers; chunks are whole row groups, in a seeded order, of up to PARQUET_MIX x chunk_size rows."""
    locs, stems, rgs, firsts, nrows = [], [], [], [], []
    for loc, stem in _parquet_files(cfg.path):
        fs, p = storage.resolve(loc)
        try:
            with fs.open_input_file(p) as f:
                pf = pq.ParquetFile(f)
                meta, schema = pf.metadata, pf.schema_arrow
        except (OSError, pa.ArrowInvalid) as e:
            raise DatasetError(f"{loc}: unreadable Parquet file ({e})") from None
        _check_schema(loc, schema, cfg)
        first = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n:
                locs.append(loc), stems.append(stem), rgs.append(g), firsts.append(first), nrows.append(n)
            first += n
    if not nrows:
        raise DatasetError(f"{cfg.path}: the Parquet source has no rows")
    # Row groups in a seeded order, PARQUET_MIX x chunk_size rows of them per chunk: a chunk gathers
    # row groups from all over a label-sorted source, and ingest deals its rows out over
    # PARQUET_MIX shards (by id hash), so each shard mixes them. A row group is read whole, so one
    # bigger than that stays a chunk of its own; the trainers' shuffle buffer covers that case.
    order = np.random.default_rng([int(cfg.seed), 7]).permutation(len(nrows))
    locs, stems, rgs, firsts, nrows = ([v[i] for i in order] for v in (locs, stems, rgs, firsts, nrows))
    items = pa.table({"file": locs, "stem": stems, "row_group": pa.array(rgs, pa.int32()),
                      "first_row": pa.array(firsts, pa.int64()), "num_rows": pa.array(nrows, pa.int64())})
    # Greedy: a chunk closes once it holds chunk_size rows (a bigger row group is a chunk of its own).
    chunk_of, c, acc = np.zeros(len(nrows), np.int64), 0, 0
    for j, n in enumerate(nrows):
        if acc and acc + n > cfg.chunk_size * PARQUET_MIX:
            c, acc = c + 1, 0
        chunk_of[j], acc = c, acc + n
    names = [str(c) for c in cfg.class_names] or None
    infos = []
    for loc in dict.fromkeys(locs):
        fs, p = storage.resolve(loc)
        infos.append(fs.get_file_info(p))
    return Listing(pack_chunks(items, chunk_of), names, int(sum(nrows)), _fingerprint(infos))


def _row_groups(desc: dict, columns: list[str]) -> Iterator[tuple[str, str, int, pa.Table]]:
    """``(file, stem, first row, table)`` of each of a chunk's row groups, opening each file once."""
    runs: dict[str, list[tuple[str, int, int]]] = {}
    for loc, stem, g, first in zip(desc["file"], desc["stem"], desc["row_group"], desc["first_row"]):
        runs.setdefault(loc, []).append((stem, g, first))
    for loc, groups in runs.items():
        fs, p = storage.resolve(loc)
        try:
            with fs.open_input_file(p) as f:
                pf = pq.ParquetFile(f)
                for stem, g, first in groups:
                    yield loc, stem, first, pf.read_row_group(g, columns=columns)
        except (OSError, pa.ArrowInvalid) as e:
            raise DatasetError(f"{loc}: cannot read its row groups ({e})") from None


def _check_labels(cfg: IngestConfig, loc: str, first: int, col: pa.ChunkedArray) -> np.ndarray:
    """int64 labels of one row group; nulls and labels out of range raise naming ``file: row N``."""
    col = col.combine_chunks()
    if col.null_count:
        r = first + int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise DatasetError(f"{loc}: row {r}: null label in column '{cfg.label_column}'")
    y = col.to_numpy().astype(np.int64)
    n = len(cfg.class_names)
    bad = np.flatnonzero((y < 0) | (y >= n)) if n else np.flatnonzero(y < 0)
    if bad.size:
        r = int(bad[0])
        hi = n if n else "max label + 1"
        raise DatasetError(f"{loc}: row {first + r}: label {y[r]} out of range [0, {hi}) in column '{cfg.label_column}'")
    return y


def _parquet_labels(cfg: IngestConfig, desc: dict) -> tuple[list[str], np.ndarray]:
    ids, labels = [], []
    for loc, stem, first, t in _row_groups(desc, [cfg.label_column]):
        y = _check_labels(cfg, loc, first, t.column(0))
        ids += [f"{stem}-{first + r:07d}" for r in range(len(y))]
        labels.append(y)
    return ids, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def _parquet_images(cfg: IngestConfig, desc: dict) -> Iterator[tuple[str, int, str, Image.Image]]:
    for loc, stem, first, t in _row_groups(desc, [cfg.image_column, cfg.label_column]):
        y = _check_labels(cfg, loc, first, t.column(cfg.label_column))
        col = t.column(cfg.image_column).combine_chunks()
        if pa.types.is_struct(col.type):
            col = col.field("bytes")
        for r, data in enumerate(col.to_pylist()):
            where = f"{loc} row {first + r}"
            if not isinstance(data, (bytes, bytearray)):
                raise DatasetError(f"{where}: column '{cfg.image_column}' holds {type(data).__name__}, not image bytes")
            yield f"{stem}-{first + r:07d}", int(y[r]), where, open_image(data, where)
