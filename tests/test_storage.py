"""The storage layer and the dataset contract, on local disk and on a real S3 server (SeaweedFS).

Every test taking ``storage_root`` runs twice: once under a local temp dir, once under
``s3://synthaug-test/...`` on the server the ``s3_server`` fixture starts on 127.0.0.1.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthaug import artifacts, storage
from synthaug.artifacts import DatasetError

CLASSES = ["a", "b", "c"]
META = {"class_names": CLASSES, "image_size": (4, 4), "channels": 1, "config": {"test": True}}


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), v % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rows(n: int, start: int = 0, tag: str = "r") -> pa.Table:
    idx = list(range(start, start + n))
    return pa.table({
        "id": [f"{tag}{i:05d}" for i in idx],
        "image": pa.array([_png(i) for i in idx], pa.binary()),
        "label": pa.array([i % len(CLASSES) for i in idx], pa.int64()),
        "class_name": [CLASSES[i % len(CLASSES)] for i in idx],
        "source": ["real"] * n,
    })


def ids_of(table: pa.Table) -> list[str]:
    return sorted(table.column("id").to_pylist())


# ----------------------------------------------------------------------------- storage helpers


def test_write_read_list_delete(storage_root):
    root = storage_root
    f = storage.join(root, "a", "b.bin")
    assert not storage.exists(f) and storage.list_files(root) == []
    storage.write_bytes(f, b"one")
    storage.write_bytes(f, b"two")  # a rewrite replaces the whole file
    assert storage.read_bytes(f) == b"two" and storage.is_file(f) and not storage.is_dir(f)
    assert storage.is_dir(storage.join(root, "a"))
    storage.write_json(storage.join(root, "m.json"), {"n": np.int64(3), "t": (1, 2)})
    assert storage.read_json(storage.join(root, "m.json")) == {"n": 3, "t": [1, 2]}
    storage.write_text(storage.join(root, "a", "c", "d.txt"), "deep")
    names = [storage.basename(i.path) for i in storage.list_files(root)]
    assert names == ["b.bin", "d.txt", "m.json"]  # no temporary siblings left behind
    assert [storage.basename(i.path) for i in storage.list_files(storage.join(root, "a"), recursive=False)] == ["b.bin"]
    assert storage.list_dirs(root) == ["a"] and storage.list_dirs(storage.join(root, "a")) == ["c"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(storage.join(root, "missing"))
    storage.delete(f)
    assert not storage.exists(f) and storage.read_text(storage.join(root, "a", "c", "d.txt")) == "deep"
    storage.delete(storage.join(root, "a"))  # a whole tree
    assert not storage.exists(storage.join(root, "a", "c", "d.txt"))
    storage.delete(storage.join(root, "a"))  # absent: a no-op
    assert [storage.basename(i.path) for i in storage.list_files(root)] == ["m.json"]


def test_names():
    assert storage.join("s3://b/p/", "x", "/y/") == "s3://b/p/x/y"
    assert storage.join("rel", "x") == os.path.join("rel", "x")
    assert storage.parent("s3://b/p/x") == "s3://b/p" and storage.basename("s3://b/p/x/") == "x"
    assert storage.absolute("s3://b/p") == "s3://b/p" and storage.absolute("rel") == os.path.abspath("rel")
    assert storage.is_uri("s3://b") and not storage.is_uri("file:///x") and not storage.is_uri("/x")
    assert storage.local_path("s3://b/p") is None
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.resolve("s3:///nobucket")


def test_s3_resolves_through_the_test_server(s3_server, s3_root):
    fs, path = storage.resolve(s3_root)
    assert type(fs).__name__ == "S3FileSystem" and path.startswith(f"{s3_server.bucket}/")
    kw = storage.ray_storage(s3_root)
    assert kw["storage_path"] == path and kw["storage_filesystem"] is fs
    storage.write_text(storage.join(s3_root, "x.txt"), "hi")  # visible through an independent client
    with s3_server.filesystem().open_input_stream(f"{path}/x.txt") as f:
        assert f.read() == b"hi"


def test_upload_download_localize(storage_root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"w" * 1000)
    (src / "sub" / "c.json").write_text("{}")
    (src / "manifest.json").write_text("{}")
    loc = storage.join(storage_root, "tree")
    storage.upload_dir(src, loc, skip=("manifest.json",))
    assert sorted(storage.basename(i.path) for i in storage.list_files(loc)) == ["c.json", "w.bin"]
    out = storage.download_dir(loc, tmp_path / "dst")
    assert (out / "w.bin").read_bytes() == b"w" * 1000 and (out / "sub" / "c.json").read_text() == "{}"
    os.environ["SYNTHAUG_CACHE"] = str(tmp_path / "cache")
    try:
        lp = storage.localize(loc, key=artifacts.hash_tree(loc))
        assert (lp / "sub" / "c.json").is_file()
        if storage.is_uri(loc):
            assert lp.is_relative_to(tmp_path / "cache")
    finally:
        del os.environ["SYNTHAUG_CACHE"]
    assert artifacts.hash_tree(loc) == artifacts.hash_tree(str(out))  # same tree, same hash, anywhere


# ----------------------------------------------------------------------------- the dataset contract


def test_write_table_and_read_back(ray_session, storage_root):
    loc = storage.join(storage_root, "ds")
    t = rows(30)
    m = artifacts.write_dataset(t, loc, **META)
    assert m["num_rows"] == 30 and m["counts"] == {"a": 10, "b": 10, "c": 10} and len(m["shards"]) == 1
    assert artifacts.is_complete(loc) and artifacts.read_manifest(loc)["content_hash"] == m["content_hash"]
    assert m["content_hash"] == artifacts.table_content_hash(t)
    assert ids_of(artifacts.read_table(loc)) == ids_of(t)
    assert artifacts.read_table(loc, columns=["id"]).column_names == ["id"]
    assert sum(b.num_rows for b in artifacts.iter_batches(loc, ["id", "label"], batch_size=7)) == 30
    ds = artifacts.read_ray(loc, columns=["id", "label"])
    assert ds.count() == 30 and sorted(r["id"] for r in ds.take_all()) == ids_of(t)


def test_ray_dataset_shards_and_order_independent_hash(ray_session, storage_root):
    import ray.data

    t = rows(40)
    # Three blocks -> several shard files; the same rows reversed and in one shard hash the same.
    ds = ray.data.from_arrow([t.slice(0, 13), t.slice(13, 13), t.slice(26)])
    loc = storage.join(storage_root, "ray")
    m = artifacts.write_dataset(ds, loc, **META)
    assert len(m["shards"]) >= 2 and sum(s["rows"] for s in m["shards"]) == 40 == m["num_rows"]
    assert all(s["path"].startswith("data/") and s["bytes"] > 0 for s in m["shards"])
    assert m["counts"] == {"a": 14, "b": 13, "c": 13}
    one = artifacts.write_dataset(t.take(list(range(39, -1, -1))), storage.join(storage_root, "one"), **META)
    assert m["content_hash"] == one["content_hash"] == artifacts.table_content_hash(t)
    other = artifacts.write_dataset(rows(40, start=1), storage.join(storage_root, "other"), **META)
    assert other["content_hash"] != m["content_hash"]
    assert ids_of(artifacts.read_table(loc)) == ids_of(t)
    assert artifacts.read_ray(loc).count() == 40


def test_ray_dataset_rows_land_in_its_order_whatever_finishes_first(ray_session, tmp_path):
    """An actor pool (the teacher that filters a synthetic set) finishes blocks out of order;
    the written dataset still holds them in the input order, so a run on it repeats exactly."""
    import ray.data

    class SlowFirst:  # defined here, so Ray ships it by value (this module is not importable in workers)
        """Actor: the first blocks take longest, so blocks finish in reverse order."""

        def __call__(self, batch: pa.Table) -> pa.Table:
            import time

            time.sleep(0.4 if int(batch.column("id")[0].as_py()[1:]) < 20 else 0.0)
            return batch

    t = rows(40)
    ds = ray.data.from_arrow([t.slice(i, 10) for i in range(0, 40, 10)]).map_batches(
        SlowFirst, batch_format="pyarrow", batch_size=None, compute=ray.data.ActorPoolStrategy(size=2))
    m = artifacts.write_dataset(ds, str(tmp_path / "ordered"), **META)
    assert m["num_rows"] == 40
    assert artifacts.read_table(str(tmp_path / "ordered"), ["id"]).column("id").to_pylist() == t.column("id").to_pylist()


def test_readers_read_only_listed_shards(ray_session, storage_root):
    loc = storage.join(storage_root, "ds")
    m = artifacts.write_dataset(rows(12), loc, **META)
    wid = m["shards"][0]["path"].split("/")[1]
    # A retried task's leftover in the listed write id, and a failed write's whole write id.
    for rel in (f"data/{wid}/part-99999.parquet", "data/failed-write/part-00000.parquet"):
        sink = pa.BufferOutputStream()
        pq.write_table(rows(5, start=100, tag="stray"), sink)
        storage.write_bytes(storage.join(loc, rel), sink.getvalue().to_pybytes())
    assert len(artifacts.read_table(loc)) == 12
    assert sum(b.num_rows for b in artifacts.iter_batches(loc)) == 12
    assert artifacts.read_ray(loc).count() == 12
    assert not any(i.startswith("stray") for i in artifacts.read_table(loc, ["id"]).column("id").to_pylist())


def test_incomplete_and_missing_shards_are_refused(ray_session, storage_root):
    loc = storage.join(storage_root, "ds")
    with pytest.raises(DatasetError, match="no such directory"):
        artifacts.read_table(loc)
    m = artifacts.write_dataset(rows(6), loc, **META)
    storage.delete(storage.join(loc, artifacts.MANIFEST))  # shards without their commit record
    assert not artifacts.is_complete(loc)
    for read in (artifacts.read_table, artifacts.read_ray, lambda x: list(artifacts.iter_batches(x))):
        with pytest.raises(DatasetError, match="no manifest.json, so the directory is incomplete"):
            read(loc)
    artifacts.atomic_write_json(storage.join(loc, artifacts.MANIFEST), m)
    assert len(artifacts.read_table(loc)) == 6
    storage.delete(storage.join(loc, m["shards"][0]["path"]))
    for read in (artifacts.read_table, artifacts.read_ray, lambda x: list(artifacts.iter_batches(x))):
        with pytest.raises(DatasetError, match=f"lists shard {m['shards'][0]['path']}, which is missing"):
            read(loc)


def test_rewrite_keeps_old_readable_until_the_new_manifest(ray_session, storage_root):
    loc = storage.join(storage_root, "ds")
    old = artifacts.write_dataset(rows(9), loc, **META)
    old_wid = old["shards"][0]["path"].split("/")[1]
    # A new write's shards land first (as a stage's Ray tasks write them) ...
    wid = artifacts.new_write_id()
    entries = [artifacts.write_shard(loc, wid, f"part-{k:05d}", rows(5, start=50 + 5 * k, tag="new"), CLASSES)
               for k in range(2)]
    assert artifacts.read_manifest(loc)["content_hash"] == old["content_hash"]
    assert ids_of(artifacts.read_table(loc)) == ids_of(rows(9))  # ... and readers still see the old dataset
    new = artifacts.commit_dataset(loc, entries, **META)
    assert new["num_rows"] == 10 and ids_of(artifacts.read_table(loc)) == ids_of(
        pa.concat_tables([rows(5, 50, "new"), rows(5, 55, "new")]))
    assert storage.list_dirs(storage.join(loc, artifacts.DATA_DIR)) == [wid]  # the old write id is gone
    assert not storage.exists(storage.join(loc, "data", old_wid))


def test_duplicate_ids_are_caught(ray_session, storage_root):
    import ray.data

    t = rows(8)
    dup = pa.concat_tables([t, t.slice(3, 1)])
    with pytest.raises(DatasetError, match="duplicate id 'r00003'"):
        artifacts.write_dataset(dup, storage.join(storage_root, "t"), **META)
    # Across shards of a Ray Dataset: found by the id check over Ray tasks; nothing is committed.
    loc = storage.join(storage_root, "r")
    with pytest.raises(DatasetError, match="duplicate id 'r00005'"):
        artifacts.write_dataset(ray.data.from_arrow([t, rows(3, start=5)]), loc, **META)
    assert not artifacts.is_complete(loc)
    # A bad label is caught before anything is committed, naming the id.
    bad = t.set_column(2, "label", pa.array([0, 1, 2, 0, 7, 1, 2, 0], pa.int64()))
    with pytest.raises(DatasetError, match=r"id 'r00004'.*label 7 outside \[0, 3\)"):
        artifacts.write_dataset(bad, storage.join(storage_root, "b"), **META)


# ----------------------------------------------------------------------------- Ray Train storage


def test_ray_train_checkpoint_on_s3(ray_session, s3_root):
    import ray.train
    from ray.train.torch import TorchTrainer

    def train_loop(config):  # defined here so that it pickles by value (tests/ is not on the workers' path)
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "weights.txt"), "w") as f:
                f.write(f"step={config['step']}")
            ray.train.report({"loss": 0.5}, checkpoint=ray.train.Checkpoint.from_directory(d))

    trainer = TorchTrainer(train_loop, train_loop_config={"step": 7},
                           scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
                           run_config=ray.train.RunConfig(name="ckpt", **storage.ray_storage(s3_root)))
    result = trainer.fit()
    assert result.checkpoint is not None and result.metrics["loss"] == 0.5
    # The checkpoint lives on the server, under the run's storage path ...
    files = [i.path for i in storage.list_files(storage.join(s3_root, "ckpt"))]
    assert any(p.endswith("/weights.txt") for p in files), files
    # ... and reads back through Ray Train's checkpoint API.
    with result.checkpoint.as_directory() as d:
        assert open(os.path.join(d, "weights.txt")).read() == "step=7"
