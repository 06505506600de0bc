"""Ingest: the dataset contract, the three sources, the low-data split, and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthaug.artifacts import DatasetError, read_manifest, read_table, table_content_hash
from synthaug.config import load_config
from synthaug.data import ingest


def _png(color, size=(6, 6), mode="RGB", fmt="PNG"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _folder(root, classes=("cat", "dog"), n=4, fmt="PNG", mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.{fmt.lower()}").write_bytes(_png((i * 20, 10, 200), mode=mode, fmt=fmt))
    return root


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_digits_contract(digits_dirs):
    m = read_manifest(digits_dirs["train"])
    assert m["class_names"] == [str(i) for i in range(10)]
    assert set(m["counts"].values()) == {10}
    assert m["image_size"] == [8, 8] and m["channels"] == 1 and m["schema_version"] == 1
    assert m["config"]["ingest"]["k_per_class"] == 10
    t = read_table(digits_dirs["train"])
    assert t.column_names[:5] == ["id", "image", "label", "class_name", "source"]
    assert m["content_hash"] == table_content_hash(t)
    # Splits are disjoint and cover the data; the pool has no labels.
    ids = {k: set(read_table(d, ["id"]).column("id").to_pylist()) for k, d in digits_dirs.items()}
    assert not ids["train"] & ids["val"] and not ids["pool"] & ids["val"] and not ids["train"] & ids["pool"]
    assert len(ids["train"]) + len(ids["pool"]) + len(ids["val"]) == 1797
    assert ids["train_full"] == ids["train"] | ids["pool"]
    pool = read_table(digits_dirs["pool"])
    assert set(pool.column("label").to_pylist()) == {-1} and read_manifest(digits_dirs["pool"])["labelled"] is False


def test_third_party_readers_need_no_synthaug(digits_dirs):
    import datasets
    import pandas as pd

    df = pd.read_parquet(digits_dirs["val"] / "data")
    hf = datasets.load_dataset("parquet", data_dir=str(digits_dirs["val"] / "data"), split="train")
    assert len(df) == len(hf) == read_manifest(digits_dirs["val"])["num_rows"]
    img = Image.open(io.BytesIO(df["image"][0]))
    assert img.size == (8, 8)


def test_split_is_stable(tmp_path):
    cfg = load_config(None, ["ingest.k_per_class=5"])
    a, b = ingest.run(cfg, tmp_path / "a"), ingest.run(cfg, tmp_path / "b")
    assert a["train"]["content_hash"] == b["train"]["content_hash"]
    assert a["val"]["content_hash"] == b["val"]["content_hash"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_imagefolder_formats_and_resize(tmp_path, fmt):
    _folder(tmp_path / "src", fmt=fmt)
    cfg = load_config(None, ["ingest.source=imagefolder", f"ingest.path={tmp_path/'src'}", "ingest.image_size=8", "ingest.mode=L"])
    m = ingest.run(cfg, tmp_path / "out")
    assert m["train"]["class_names"] == ["cat", "dog"] and m["train"]["image_size"] == [8, 8]
    assert m["train"]["channels"] == 1
    assert m["train"]["num_rows"] + m["val"]["num_rows"] == 8


def test_parquet_source(tmp_path):
    tbl = pa.table({"img": [{"bytes": _png((i, i, i)), "path": None} for i in range(12)], "y": [i % 3 for i in range(12)]})
    pq.write_table(tbl, tmp_path / "src.parquet")
    cfg = load_config(None, ["ingest.source=parquet", f"ingest.path={tmp_path/'src.parquet'}",
                             "ingest.image_column=img", "ingest.label_column=y", "ingest.class_names=[a,b,c]"])
    m = ingest.run(cfg, tmp_path / "out")
    assert m["train"]["class_names"] == ["a", "b", "c"]
    assert sum(m["train"]["counts"].values()) + sum(m["val"]["counts"].values()) == 12


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def earlier(tmp_path):
    """An earlier, complete ingest output that bad runs must leave untouched."""
    out = tmp_path / "out"
    ingest.run(load_config(None, ["ingest.k_per_class=3"]), out)
    return out, _snapshot(out)


def _bad_folder_cfg(path, *extra):
    return load_config(None, ["ingest.source=imagefolder", f"ingest.path={path}", *extra])


def test_missing_path(tmp_path, earlier):
    out, snap = earlier
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'} does not exist"):
        ingest.run(_bad_folder_cfg(tmp_path / "nope"), out)
    assert _snapshot(out) == snap


def test_empty_class_folder(tmp_path, earlier):
    out, snap = earlier
    root = _folder(tmp_path / "src")
    (root / "emu").mkdir()
    with pytest.raises(DatasetError, match="empty class folder 'emu'"):
        ingest.run(_bad_folder_cfg(root), out)
    assert _snapshot(out) == snap


def test_truncated_image(tmp_path, earlier):
    out, snap = earlier
    root = _folder(tmp_path / "src", n=3)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big, format="PNG")
    (root / "dog" / "bad.png").write_bytes(big.getvalue()[:200])
    with pytest.raises(DatasetError, match=r"dog/bad\.png: unreadable or truncated image"):
        ingest.run(_bad_folder_cfg(root), out)
    assert _snapshot(out) == snap


def test_mixed_modes(tmp_path, earlier):
    out, snap = earlier
    root = _folder(tmp_path / "src", n=3)
    (root / "dog" / "gray.png").write_bytes(_png(128, mode="L"))
    with pytest.raises(DatasetError, match=r"gray\.png: image mode 'L' differs.*mixed image modes"):
        ingest.run(_bad_folder_cfg(root), out)
    assert _snapshot(out) == snap
    # ... and converting them is one config key away.
    ingest.run(_bad_folder_cfg(root, "ingest.mode=RGB"), tmp_path / "ok")


def test_label_out_of_range(tmp_path, earlier):
    out, snap = earlier
    tbl = pa.table({"image": [_png((i, 0, 0)) for i in range(6)], "label": [0, 1, 0, 1, 5, 0]})
    pq.write_table(tbl, tmp_path / "src.parquet")
    cfg = load_config(None, ["ingest.source=parquet", f"ingest.path={tmp_path/'src.parquet'}", "ingest.class_names=[a,b]"])
    with pytest.raises(DatasetError, match=r"src\.parquet: row 4: label 5 out of range \[0, 2\)"):
        ingest.run(cfg, out)
    assert _snapshot(out) == snap


def test_directory_without_manifest_is_not_a_dataset(tmp_path, earlier):
    out, _ = earlier
    (out / "train" / "manifest.json").unlink()
    with pytest.raises(DatasetError, match=r"train: no manifest\.json.*incomplete"):
        read_table(out / "train")


def test_k_larger_than_class(tmp_path, earlier):
    out, snap = earlier
    with pytest.raises(DatasetError, match=r"k_per_class=500 is larger than class '0'"):
        ingest.run(load_config(None, ["ingest.k_per_class=500"]), out)
    assert _snapshot(out) == snap


def test_unknown_config_key_leaves_outputs(tmp_path, earlier):
    out, snap = earlier
    from synthaug.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'ingest.kk'"):
        load_config(None, ["ingest.kk=3"])
    assert _snapshot(out) == snap
