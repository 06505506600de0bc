"""Contract datasets read by Hugging Face ``datasets``: every writer stores the features
(``Image``, ``ClassLabel``, ``Value``) in each shard's ``huggingface`` schema metadata, and
the ``image`` column stays plain binary PNG bytes for every other reader."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from synthaug import artifacts
from synthaug.artifacts import hf_features, read_manifest, read_table, shard_paths, with_hf_features
from synthaug.config import load_config

datasets = pytest.importorskip("datasets")

NAMES = [str(i) for i in range(10)]


def _png(v: int, size=(5, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, v).save(buf, format="PNG")
    return buf.getvalue()


def _features(path: str) -> "datasets.Features":
    """The features one shard file carries."""
    meta = pq.read_schema(path).metadata[b"huggingface"]
    return datasets.Features.from_dict(json.loads(meta)["info"]["features"])


def _load(location, tmp_path, features=None):
    """``load_dataset("parquet")`` over the shards the manifest lists, as the docs show it."""
    files = [str(p) for p in shard_paths(location)]
    return datasets.load_dataset("parquet", data_files=files, split="train", features=features,
                                 cache_dir=str(tmp_path / "hf-cache"))


def _check_images(ds, location, size=(8, 8)):
    """Each row's image decodes to a PIL image of ``size`` from exactly the stored PNG bytes."""
    t = read_table(location, ["id", "image"])
    stored = dict(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))
    assert len(ds) == len(stored) > 0
    for row in ds:
        assert isinstance(row["image"], Image.Image) and row["image"].size == size
    raw = ds.cast_column("image", datasets.Image(decode=False))
    assert {r["id"]: r["image"]["bytes"] for r in raw} == stored


def test_features_are_datasets_own_for_every_column_type():
    """Value dtypes are the ones ``datasets`` infers from the Arrow types; other types are left to it."""
    t = pa.table({"id": ["a"], "image": [_png(1)], "label": pa.array([2], pa.int64()), "class_name": ["2"],
                  "source": ["synthetic"], "seed": pa.array([7], pa.int64()), "guidance_scale": [2.0],
                  "confidence": pa.array([0.5], pa.float32()), "flag": [True], "tags": [[1, 2]]})
    f = datasets.Features.from_dict(hf_features(t.schema, NAMES))
    assert f["image"] == datasets.Image() and f["label"] == datasets.ClassLabel(names=NAMES)
    inferred = datasets.Features.from_arrow_schema(t.schema)
    assert "tags" not in f and set(f) == set(t.column_names) - {"tags"}
    for name in set(f) - {"image", "label"}:
        assert f[name] == inferred[name], name
    # A latent cache's image column is float bytes, not PNG; without class names the label is a plain int.
    assert hf_features(t.schema, NAMES, "latent-moments")["image"] == {"dtype": "binary", "_type": "Value"}
    assert hf_features(t.schema, [])["label"] == {"dtype": "int64", "_type": "Value"}
    # The columns and the bytes are untouched; earlier schema metadata is kept.
    m = with_hf_features(t.replace_schema_metadata({"other": "x"}), NAMES)
    assert m.equals(t) and m.schema.metadata[b"other"] == b"x" and m.schema.field("image").type == pa.binary()


def test_ingested_splits_load_as_images_with_class_labels(digits_dirs, tmp_path):
    train, pool = digits_dirs["train"], digits_dirs["pool"]
    for p in shard_paths(train):
        assert _features(p)["label"] == datasets.ClassLabel(names=NAMES)
        assert pq.read_schema(p).field("image").type == pa.binary()  # what Ray Data, pyarrow and trainers read
    ds = _load(train, tmp_path)
    # The class names come from the metadata alone; the binary column decodes through Image.
    assert ds.features["label"] == datasets.ClassLabel(names=NAMES)
    assert ds.features["id"] == datasets.Value("string")
    m = read_manifest(train)
    assert {n: ds.features["label"].int2str(ds["label"]).count(n) for n in NAMES} == m["counts"]
    _check_images(ds.cast_column("image", datasets.Image()), train)
    # Passing the stored features decodes at load time, the same images.
    _check_images(_load(train, tmp_path, features=_features(shard_paths(train)[0])), train)
    # The unlabelled pool: datasets' own "no label" (-1), class names still known.
    pl = _load(pool, tmp_path).cast_column("image", datasets.Image())
    assert pl.features["label"].names == NAMES and set(pl["label"]) == {-1}
    _check_images(pl, pool)


def test_ray_written_dataset_with_extra_columns(ray_session, tmp_path):
    """The Ray Data writer (pseudo-labels, filtered sets) stores the features with its extra columns."""
    import ray.data

    names = ["a", "b", "c"]
    n = 12
    t = pa.table({"id": [f"r{i:02d}" for i in range(n)], "image": pa.array([_png(i * 20) for i in range(n)], pa.binary()),
                  "label": pa.array([i % 3 for i in range(n)], pa.int64()), "class_name": [names[i % 3] for i in range(n)],
                  "source": ["pseudo"] * n, "confidence": pa.array(np.linspace(0.5, 1, n), pa.float32())})
    loc = str(tmp_path / "ds")
    m = artifacts.write_dataset(ray.data.from_arrow([t.slice(0, 5), t.slice(5)]), loc, class_names=names,
                                image_size=(5, 3), channels=1, config={})
    assert len(m["shards"]) == 2 and m["columns"] == t.column_names
    for p in shard_paths(loc):
        assert _features(p)["confidence"] == datasets.Value("float32")
    assert read_table(loc).select(t.column_names).sort_by("id").equals(t)  # same rows, types and bytes
    ds = _load(loc, tmp_path).cast_column("image", datasets.Image())
    assert ds.features["label"] == datasets.ClassLabel(names=names)
    assert ds.features["confidence"] == datasets.Value("float32")
    _check_images(ds, loc, size=(5, 3))


def test_sampled_img2img_set_loads_with_its_provenance(ray_session, digits_dirs, tmp_path):
    """A sampled set (image-to-image, the most columns) from a tiny random-weight unet."""
    from synthaug.generative import models, sample

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gen = models.new_generator("unet", "tiny", NAMES, 8, 1)
    models.save_generator(gen, tmp_path / "gen", {"steps": 0})
    cfg = load_config(None, ["sample.steps=2", "sample.batch_size=4", "sample.class_counts={'3': 2, '7': 1}",
                             "sample.init=real", "sample.strength=0.5"])
    out, m = sample.run(cfg, tmp_path / "gen", tmp_path / "syn", source_dir=str(digits_dirs["train"]))
    f = _features(shard_paths(out)[0])
    assert f["image"] == datasets.Image() and f["steps"] == datasets.Value("int64")
    assert set(f) == set(m["columns"]) and f["strength"] == datasets.Value("float64")
    ds = _load(out, tmp_path, features=f)
    assert sorted(ds.features["label"].int2str(ds["label"])) == ["3", "3", "7"]
    assert ds.features["guidance_scale"] == datasets.Value("float64")
    assert ds["source_id"] == read_table(out, ["source_id"]).column("source_id").to_pylist()
    _check_images(ds, out)
