"""IDX (Fashion-MNIST's format) to the Parquet source: tiny IDX files written here, converted and ingested."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthaug.cli import main
from synthaug.data import idx


def _write_idx(d, split: str, n: int, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 7, 5), dtype=np.uint8)
    y = (np.arange(n) % 3).astype(np.uint8)
    stem = idx.SPLITS[split]
    op = gzip.open if gz else open
    with op(d / f"{stem}-images-idx3-ubyte{'.gz' if gz else ''}", "wb") as f:
        f.write(b"\0\0\x08\x03" + struct.pack(">3I", n, 7, 5) + x.tobytes())
    with op(d / f"{stem}-labels-idx1-ubyte{'.gz' if gz else ''}", "wb") as f:
        f.write(b"\0\0\x08\x01" + struct.pack(">I", n) + y.tobytes())
    return x, y


def test_idx_pair_to_parquet_keeps_pixels_labels_and_order(tmp_path):
    x, y = _write_idx(tmp_path, "train", 23)
    xt, yt = _write_idx(tmp_path, "test", 4, gz=False, seed=1)
    out = idx.fashion_mnist(str(tmp_path / "pq"), str(tmp_path))
    t = pq.read_table(out["train"])
    assert t.num_rows == 23 and t.column("label").to_pylist() == y.tolist()
    got = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in t.column("image").to_pylist()])
    assert np.array_equal(got, x)
    assert pq.read_table(out["test"]).column("label").to_pylist() == yt.tolist()
    assert pq.ParquetFile(out["train"]).metadata.num_row_groups == 1


def test_idx_bad_input_is_one_line(tmp_path, capsys):
    assert main(["fashion-mnist", "--out", str(tmp_path / "o"), "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-images-idx3-ubyte.gz" in err[0]
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 1) + b"\0")
    with pytest.raises(idx.InputValueError, match="train-images-idx3-ubyte: not an IDX file"):
        idx.to_parquet(str(tmp_path / "train-images-idx3-ubyte"), str(tmp_path / "train-labels-idx1-ubyte"),
                       str(tmp_path / "x.parquet"))


def test_fashion_mnist_parquet_ingests_with_classes(ray_session, tmp_path):
    from synthaug.config import load_config
    from synthaug.data import ingest

    _write_idx(tmp_path, "train", 60)
    _write_idx(tmp_path, "test", 6, seed=1)
    out = idx.fashion_mnist(str(tmp_path / "pq"), str(tmp_path))
    cfg = load_config(None, ["ingest.source=parquet", f"ingest.path={out['train']}", "ingest.mode=L",
                             "ingest.image_size=8", "ingest.class_names=[a,b,c]"])
    m = ingest.run(cfg, str(tmp_path / "data"))
    assert m["train"]["image_size"] == [8, 8] and m["train"]["channels"] == 1
    assert sum(m["train"]["counts"].values()) + sum(m["val"]["counts"].values()) == 60
