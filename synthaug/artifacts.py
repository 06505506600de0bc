"""The dataset contract: a Parquet directory plus ``manifest.json``, written atomically.

Layout of a contract dataset directory::

    <dataset>/
      data/part-*.parquet   rows: id, image (PNG bytes), label, class_name, source, [provenance]
      manifest.json         written last; a directory without it is incomplete

pandas (``pd.read_parquet("<dataset>/data")``), pyarrow and Hugging Face ``datasets``
(``load_dataset("parquet", data_dir="<dataset>/data")``) read it with no synthaug code.

Every write goes to a temporary sibling directory that is renamed into place once the
manifest is in it, so an earlier output is never left half-overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DATA_DIR = "data"
BASE_COLUMNS = ("id", "image", "label", "class_name", "source")
PROVENANCE_COLUMNS = ("generator", "seed", "guidance_scale", "sampler", "steps")
UNLABELLED = -1  # label of rows in an unlabelled pool


class DatasetError(ValueError):
    """A dataset on disk is missing, incomplete or breaks the contract; names the path."""


# ----------------------------------------------------------------------------- files


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def staging_dir(final: str | Path) -> Path:
    """A fresh temporary sibling of ``final`` to build an output in."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move a finished staging directory into place, replacing ``final`` only at the end."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: str | Path, skip: Iterable[str] = (MANIFEST,)) -> str:
    """Content hash of every file under ``path`` (relative names + bytes), skipping ``skip``."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in set(skip)):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """Stable hash of a JSON-able object (configs, plans)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=_json_default).encode())


def table_content_hash(table: pa.Table) -> str:
    """Hash of (id, label, image) over rows sorted by id: independent of sharding."""
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_pylist()
    images = table.column("image").to_pylist()
    h = hashlib.sha256()
    for i in np.argsort(np.asarray(ids, dtype=object), kind="stable"):
        h.update(ids[i].encode())
        h.update(str(labels[i]).encode())
        h.update(hashlib.sha256(images[i]).digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------- datasets


def validate_table(table: pa.Table, class_names: list[str], where: str, labelled: bool = True) -> None:
    """Check the contract's columns, id uniqueness and label range; raise naming the row."""
    missing = [c for c in BASE_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: missing column(s) {missing}; the contract needs {list(BASE_COLUMNS)}")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise DatasetError(f"{where}: duplicate id {dup!r}")
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    if labelled:
        bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
        if bad.size:
            r = int(bad[0])
            raise DatasetError(f"{where}: row {r} (id {ids[r]!r}) has label {labels[r]} outside [0, {len(class_names)})")


def write_dataset(
    data: pa.Table | Any,
    path: str | Path,
    **manifest_kwargs: Any,
) -> dict:
    """Write a contract dataset atomically; ``data`` is a pyarrow Table or a Ray Dataset.

    The rows go to a staging directory, then :func:`finalize_dataset` validates and
    hashes them, writes the manifest last and renames the directory to ``path``.
    """
    tmp = staging_dir(path)
    try:
        if isinstance(data, pa.Table):
            (tmp / DATA_DIR).mkdir()
            pq.write_table(data, tmp / DATA_DIR / "part-00000.parquet")
        else:  # a Ray Dataset: let Ray write the shards.
            data.write_parquet(str(tmp / DATA_DIR))
        return finalize_dataset(tmp, path, **manifest_kwargs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finalize_dataset(
    tmp: str | Path,
    path: str | Path,
    *,
    class_names: list[str],
    image_size: tuple[int, int],
    channels: int,
    config: dict,
    labelled: bool = True,
    extra: dict | None = None,
) -> dict:
    """Validate the shards in ``tmp/data``, write the manifest last, rename ``tmp`` to ``path``."""
    tmp = Path(tmp)
    table = pq.read_table(tmp / DATA_DIR)
    validate_table(table, class_names, str(path), labelled=labelled)
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    counts = {name: int((labels == k).sum()) for k, name in enumerate(class_names)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_rows": table.num_rows,
        "class_names": list(class_names),
        "counts": counts,
        "labelled": labelled,
        "image_size": list(image_size),
        "channels": channels,
        "image_encoding": "png",
        "columns": table.column_names,
        "content_hash": table_content_hash(table),
        "config": config,
        **(extra or {}),
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    commit_dir(tmp, path)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete dataset (or generator) directory; incomplete ones raise."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such directory")
    m = path / MANIFEST
    if not m.is_file():
        raise DatasetError(f"{path}: no {MANIFEST}, so the directory is incomplete and is not read")
    try:
        manifest = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{m}: unreadable manifest ({e})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{m}: schema_version {version!r}, this synthaug reads {SCHEMA_VERSION}")
    return manifest


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a complete contract dataset into memory (small data: tests, metrics)."""
    read_manifest(path)
    return pq.read_table(Path(path) / DATA_DIR, columns=columns)


def read_ray(path: str | Path, columns: list[str] | None = None):
    """Read a complete contract dataset as a Ray Dataset."""
    import ray.data

    read_manifest(path)
    return ray.data.read_parquet(str(Path(path) / DATA_DIR), columns=columns)
