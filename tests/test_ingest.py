"""Ingest: the dataset contract, the three sources, the low-data split, its invariance, and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthaug.artifacts import DatasetError, read_manifest, read_table, shard_paths, table_content_hash
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
    """Every file's bytes and every directory under ``d``."""
    return {p.relative_to(d): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


def _noise_folder(root, classes=("ant", "bee", "cow"), n=70, size=(6, 6)):
    """A few hundred tiny procedural images, PNG and JPEG mixed."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            fmt = "PNG" if i % 3 else "JPEG"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format=fmt)
            (root / c / f"{i:03d}.{fmt.lower()}").write_bytes(buf.getvalue())
    return root


def test_digits_contract(digits_dirs):
    m = read_manifest(digits_dirs["train"])
    assert m["class_names"] == [str(i) for i in range(10)]
    assert set(m["counts"].values()) == {10}
    assert m["image_size"] == [8, 8] and m["channels"] == 1 and m["schema_version"] == 2
    assert m["config"]["ingest"]["k_per_class"] == 10
    t = read_table(digits_dirs["train"])
    assert t.column_names[:5] == ["id", "image", "label", "class_name", "source"]
    assert m["content_hash"] == table_content_hash(t)
    # Splits are disjoint and cover the data; the pool has no labels.
    ids = {k: set(read_table(d, ["id"]).column("id").to_pylist()) for k, d in digits_dirs.items()}
    assert not ids["train"] & ids["val"] and not ids["pool"] & ids["val"] and not ids["train"] & ids["pool"]
    assert len(ids["train"]) + len(ids["pool"]) + len(ids["val"]) == 1797
    assert 0.27 < len(ids["val"]) / 1797 < 0.33  # val iff hash(seed, id) < val_fraction = 0.3
    assert ids["train_full"] == ids["train"] | ids["pool"]
    pool = read_table(digits_dirs["pool"])
    assert set(pool.column("label").to_pylist()) == {-1} and read_manifest(digits_dirs["pool"])["labelled"] is False


def test_third_party_readers_need_no_synthaug(digits_dirs):
    """Plain pandas / HF datasets read a dataset from the shards its manifest lists (never ``data/`` blindly)."""
    import datasets
    import pandas as pd

    m = json.loads((digits_dirs["val"] / "manifest.json").read_text())
    files = [str(digits_dirs["val"] / s["path"]) for s in m["shards"]]
    assert files == shard_paths(digits_dirs["val"])
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    hf = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(df) == len(hf) == m["num_rows"] == sum(s["rows"] for s in m["shards"])
    img = Image.open(io.BytesIO(df["image"][0]))
    assert img.size == (8, 8)


def test_split_is_stable(tmp_path):
    cfg = load_config(None, ["ingest.k_per_class=5"])
    a, b = ingest.run(cfg, tmp_path / "a"), ingest.run(cfg, tmp_path / "b")
    assert a["train"]["content_hash"] == b["train"]["content_hash"]
    assert a["val"]["content_hash"] == b["val"]["content_hash"]


def test_split_does_not_depend_on_chunking(tmp_path):
    """Same seed, different chunk sizes (so different tasks and shards): the same rows in every split."""
    root = _noise_folder(tmp_path / "src")
    base = ["ingest.source=imagefolder", f"ingest.path={root}", "ingest.k_per_class=5"]
    a = ingest.run(load_config(None, [*base, "ingest.chunk_size=16"]), str(tmp_path / "a"))
    b = ingest.run(load_config(None, [*base, "ingest.chunk_size=1000"]), str(tmp_path / "b"))
    assert set(a) == set(b) == {"train", "val", "pool", "train_full"}
    for split in a:
        assert a[split]["content_hash"] == b[split]["content_hash"], split
        assert a[split]["counts"] == b[split]["counts"] and a[split]["num_rows"] == b[split]["num_rows"], split
        assert len(a[split]["shards"]) > len(b[split]["shards"]) == 1
    assert set(a["train"]["counts"].values()) == {5}
    assert a["train"]["num_rows"] + a["pool"]["num_rows"] + a["val"]["num_rows"] == 210
    # ... and another seed gives another split.
    c = ingest.run(load_config(None, [*base, "ingest.seed=1"]), str(tmp_path / "c"))
    assert c["val"]["content_hash"] != a["val"]["content_hash"]


def test_split_rule_is_a_function_of_seed_and_id():
    ids = [f"c/{i}.png" for i in range(2000)]
    keys = ingest.split_keys(ids, seed=0)
    assert keys.shape == (2000, 2) and keys.dtype == np.uint64
    assert (ingest.split_keys(ids[::-1], seed=0) == keys[::-1]).all()
    assert (ingest.split_keys(ids[5:9], seed=0) == keys[5:9]).all()
    assert (ingest.split_keys(ids, seed=1) != keys).all()
    share = (keys[:, 0] < np.uint64(ingest.val_threshold(0.3))).mean()
    assert 0.27 < share < 0.33


def test_tiny_classes_still_get_train_and_val(tmp_path):
    """A class of 2 images gets one train and one val image whatever the hashes say."""
    root = _noise_folder(tmp_path / "src", classes=("a", "b", "c", "d", "e", "f"), n=2)
    m = ingest.run(_bad_folder_cfg(root), str(tmp_path / "out"))
    assert set(m["train"]["counts"].values()) == set(m["val"]["counts"].values()) == {1}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_imagefolder_formats_and_resize(tmp_path, fmt):
    _folder(tmp_path / "src", fmt=fmt)
    cfg = load_config(None, ["ingest.source=imagefolder", f"ingest.path={tmp_path/'src'}", "ingest.image_size=8", "ingest.mode=L"])
    m = ingest.run(cfg, tmp_path / "out")
    assert m["train"]["class_names"] == ["cat", "dog"] and m["train"]["image_size"] == [8, 8]
    assert m["train"]["channels"] == 1
    assert m["train"]["num_rows"] + m["val"]["num_rows"] == 8


def test_parquet_directory_row_groups(tmp_path):
    """Several files and row groups, chunks smaller than a file: ids are ``<file stem>-<row in file>``."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        tbl = pa.table({"image": [_png((i, 0, 0)) for i in range(11)], "label": [i % 2 for i in range(11)]})
        pq.write_table(tbl, src / f"{name}.parquet", row_group_size=3)
    cfg = load_config(None, ["ingest.source=parquet", f"ingest.path={src}", "ingest.chunk_size=4"])
    m = ingest.run(cfg, str(tmp_path / "out"))
    assert m["train"]["class_names"] == ["0", "1"] and m["train"]["image_size"] == [6, 6]
    ids = {i for s in ("train", "val") for i in read_table(tmp_path / "out" / s, ["id"]).column("id").to_pylist()}
    assert ids == {f"{n}-{r:07d}" for n in ("a", "b") for r in range(11)}
    assert len(m["train"]["shards"]) > 2


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


@pytest.mark.parametrize("chunk_size", [1000, 2])  # seen within one task / only across tasks
def test_mixed_modes(tmp_path, earlier, chunk_size):
    out, snap = earlier
    root = _folder(tmp_path / "src", n=3)
    (root / "dog" / "gray.png").write_bytes(_png(128, mode="L"))
    with pytest.raises(DatasetError, match=r"dog/gray\.png: image mode 'L' differs from 'RGB' \(.*cat/\d\.png\).*mixed image modes"):
        ingest.run(_bad_folder_cfg(root, f"ingest.chunk_size={chunk_size}"), out)
    assert _snapshot(out) == snap
    # ... and converting them is one config key away.
    ingest.run(_bad_folder_cfg(root, "ingest.mode=RGB"), tmp_path / "ok")


@pytest.mark.parametrize("chunk_size", [1000, 2])
def test_differing_sizes(tmp_path, earlier, chunk_size):
    out, snap = earlier
    root = _folder(tmp_path / "src", n=3)
    (root / "dog" / "wide.png").write_bytes(_png((1, 2, 3), size=(9, 6)))
    with pytest.raises(DatasetError, match=r"dog/wide\.png: size \(9, 6\) differs from \(6, 6\).*ingest\.image_size"):
        ingest.run(_bad_folder_cfg(root, f"ingest.chunk_size={chunk_size}"), out)
    assert _snapshot(out) == snap


def test_failure_after_shards_were_written_keeps_earlier_outputs(tmp_path, earlier):
    """The bad image is in the last task: earlier tasks wrote shards into out_dir, which are removed again."""
    out, snap = earlier
    manifests = {s: (out / s / "manifest.json").read_bytes() for s in ("train", "val", "pool", "train_full")}
    root = _noise_folder(tmp_path / "src", n=20)
    (root / "cow" / "zzz.png").write_bytes(_png((1, 2, 3))[:40])
    with pytest.raises(DatasetError, match=r"cow/zzz\.png: unreadable or truncated image"):
        ingest.run(_bad_folder_cfg(root, "ingest.chunk_size=8", "ingest.k_per_class=2"), out)
    assert {s: (out / s / "manifest.json").read_bytes() for s in manifests} == manifests
    assert _snapshot(out) == snap  # no stray write-id directories either
    assert read_table(out / "train").num_rows == 30


def test_parquet_missing_column_and_float_labels(tmp_path, earlier):
    out, snap = earlier
    pq.write_table(pa.table({"image": [_png((1, 1, 1))] * 4, "y": [0.0, 1.0, 0.0, 1.0]}), tmp_path / "src.parquet")
    base = ["ingest.source=parquet", f"ingest.path={tmp_path / 'src.parquet'}"]
    with pytest.raises(DatasetError, match=r"src\.parquet: no column 'label' \(from ingest\.label_column\)"):
        ingest.run(load_config(None, base), out)
    with pytest.raises(DatasetError, match=r"src\.parquet: label column 'y' must hold integers, got double"):
        ingest.run(load_config(None, [*base, "ingest.label_column=y"]), out)
    assert _snapshot(out) == snap


def test_parquet_bad_image_names_file_and_row(tmp_path, earlier):
    out, snap = earlier
    images = [_png((i, 0, 0)) for i in range(10)]
    images[7] = b"not an image"
    pq.write_table(pa.table({"image": images, "label": [i % 2 for i in range(10)]}), tmp_path / "src.parquet",
                   row_group_size=4)
    cfg = load_config(None, ["ingest.source=parquet", f"ingest.path={tmp_path / 'src.parquet'}", "ingest.chunk_size=4"])
    with pytest.raises(DatasetError, match=r"src\.parquet row 7: unreadable or truncated image"):
        ingest.run(cfg, out)
    assert _snapshot(out) == snap


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


def test_imagefolder_recurses_into_subfolders_and_cuts_link_loops(tmp_path):
    """Images below a class folder belong to it, as in torchvision's ImageFolder; a symlink back up
    the tree is walked once, not forever."""
    import os

    root = _folder(tmp_path / "src", n=3)
    (root / "cat" / "more" / "deeper").mkdir(parents=True)
    (root / "cat" / "more" / "a.png").write_bytes(_png((1, 2, 3)))
    (root / "cat" / "more" / "deeper" / "b.png").write_bytes(_png((4, 5, 6)))
    os.symlink(root / "cat", root / "cat" / "more" / "loop")
    cfg = load_config(None, ["ingest.source=imagefolder", f"ingest.path={root}", "ingest.k_per_class=0"])
    m = ingest.run(cfg, str(tmp_path / "out"))
    ids = {i for s in ("train", "val") for i in read_table(tmp_path / "out" / s, ["id"]).column("id").to_pylist()}
    assert ids == {f"cat/{i}.png" for i in range(3)} | {f"dog/{i}.png" for i in range(3)} | {
        "cat/more/a.png", "cat/more/deeper/b.png"}
    assert m["train"]["counts"]["cat"] + m["val"]["counts"]["cat"] == 5


def test_test_split_is_carved_apart_and_stable(tmp_path):
    """test_fraction: a seeded share of each class that no other split holds; the val rows stay the val rows."""
    root = _noise_folder(tmp_path / "src")
    base = ["ingest.source=imagefolder", f"ingest.path={root}", "ingest.k_per_class=5"]
    a = ingest.run(load_config(None, [*base, "ingest.test_fraction=0.2", "ingest.chunk_size=16"]), str(tmp_path / "a"))
    b = ingest.run(load_config(None, [*base, "ingest.test_fraction=0.2"]), str(tmp_path / "b"))
    none = ingest.run(load_config(None, base), str(tmp_path / "none"))
    assert set(a) == {"train", "val", "pool", "train_full", "test"} and "test" not in none
    assert a["test"]["content_hash"] == b["test"]["content_hash"]
    assert a["val"]["content_hash"] == none["val"]["content_hash"]  # val is chosen before test
    ids = {s: set(read_table(tmp_path / "a" / s, ["id"]).column("id").to_pylist()) for s in a}
    assert not ids["test"] & (ids["train_full"] | ids["val"] | ids["pool"])
    assert ids["train"] <= ids["train_full"] and len(ids["test"]) + len(ids["train_full"]) + len(ids["val"]) == 210
    assert 0.13 < len(ids["test"]) / 210 < 0.27 and set(a["train"]["counts"].values()) == {5}


def test_test_path_is_a_second_source(tmp_path):
    """test_path: every row of an official test file is the test split; its classes and labels are checked."""
    def table(n, seed, labels=3):
        rng = np.random.default_rng(seed)
        return pa.table({"image": [_png(tuple(int(c) for c in rng.integers(0, 255, 3))) for _ in range(n)],
                         "label": [i % labels for i in range(n)]})
    pq.write_table(table(30, 0), tmp_path / "train.parquet")
    pq.write_table(table(9, 1), tmp_path / "test.parquet")
    base = ["ingest.source=parquet", f"ingest.path={tmp_path / 'train.parquet'}", "ingest.class_names=[a,b,c]"]
    m = ingest.run(load_config(None, [*base, f"ingest.test_path={tmp_path / 'test.parquet'}"]), str(tmp_path / "out"))
    assert m["test"]["num_rows"] == 9 and m["test"]["counts"] == {"a": 3, "b": 3, "c": 3}
    assert m["train"]["num_rows"] + m["val"]["num_rows"] == 30
    assert set(read_table(tmp_path / "out" / "test", ["id"]).column("id").to_pylist()) == {f"test-{r:07d}" for r in range(9)}
    pq.write_table(table(8, 2, labels=4), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match="bad.parquet: row 3: label 3 out of range"):
        ingest.run(load_config(None, [*base, f"ingest.test_path={tmp_path / 'bad.parquet'}"]), str(tmp_path / "bad"))
    with pytest.raises(Exception, match="exclude each other"):
        load_config(None, [*base, f"ingest.test_path={tmp_path / 'test.parquet'}", "ingest.test_fraction=0.1"])
