"""IDX files (MNIST, Fashion-MNIST) to the Parquet source layout that ``ingest.source: parquet`` reads.

An IDX pair (images ``*-images-idx3-ubyte[.gz]``, labels ``*-labels-idx1-ubyte[.gz]``) is
converted once into one Parquet file with an ``image`` column of PNG bytes and an int64
``label`` column, written in row groups of ``rows_per_group`` rows in the files' order.
Ids are then ``<file stem>-<row>``, so the official split stays recognisable. Files are
read in streaming slices (one row group at a time), never whole.

Fashion-MNIST on Debian: ``apt-get install dataset-fashion-mnist`` puts the four files in
:data:`FASHION_MNIST_DIR`; elsewhere, download them from the project's GitHub release
files (zalandoresearch/fashion-mnist, ``data/fashion``) into a directory and pass it.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthaug import storage
from synthaug.data.images import encode_png
from synthaug.errors import InputValueError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
SPLITS = {"train": "train", "test": "t10k"}


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _header(f: BinaryIO, path: str, ndim: int) -> tuple[int, ...]:
    """The dimensions of an IDX file of unsigned bytes with ``ndim`` dimensions; a bad header names the file."""
    head = f.read(4)
    if len(head) != 4 or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != ndim:
        raise InputValueError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {head.hex() or 'missing'})")
    dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    return dims


def find(directory: str, split: str) -> tuple[str, str]:
    """The (images, labels) files of ``split`` ('train' or 'test') in ``directory``, gzipped or not."""
    if split not in SPLITS:
        raise InputValueError(f"IDX split must be one of {sorted(SPLITS)}, got {split!r}")
    out = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        names = [f"{SPLITS[split]}-{kind}{gz}" for gz in (".gz", "")]
        hit = next((os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))), None)
        if hit is None:
            raise InputValueError(f"{directory}: no {names[0]} (nor {names[1]}); install dataset-fashion-mnist or "
                                  f"download the IDX files there")
        out.append(hit)
    return out[0], out[1]


def to_parquet(images: str, labels: str, out: str, rows_per_group: int = 1000, limit: int | None = None) -> int:
    """Write ``out`` (a Parquet file at any location) from an IDX images/labels pair; returns the row count."""
    with _open(images) as fi, _open(labels) as fl:
        n, h, w = _header(fi, images, 3)
        (m,) = _header(fl, labels, 1)
        if n != m:
            raise InputValueError(f"{images}: {n} images but {labels} has {m} labels")
        n = min(n, limit) if limit else n
        fs, path = storage.resolve(out)
        schema = pa.schema([("image", pa.binary()), ("label", pa.int64())])
        with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, schema) as writer:
            for a in range(0, n, rows_per_group):
                k = min(rows_per_group, n - a)
                px = np.frombuffer(fi.read(k * h * w), np.uint8)
                y = np.frombuffer(fl.read(k), np.uint8)
                if px.size != k * h * w or y.size != k:
                    raise InputValueError(f"{images}: truncated at row {a} (header says {n} rows)")
                writer.write_table(pa.table({"image": [encode_png(im) for im in px.reshape(k, h, w)],
                                             "label": pa.array(y.astype(np.int64))}, schema=schema))
    return n


def fashion_mnist(out_dir: str, source_dir: str = FASHION_MNIST_DIR, limit: int | None = None) -> dict[str, str]:
    """``out_dir/{train,test}.parquet`` from the Fashion-MNIST IDX files; returns the locations."""
    storage.makedirs(out_dir)
    got = {}
    for split in SPLITS:
        images, labels = find(source_dir, split)
        got[split] = storage.join(out_dir, f"{split}.parquet")
        to_parquet(images, labels, got[split], limit=limit)
    return got
