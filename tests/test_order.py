"""Training order at a size where it matters: class-sorted shards bigger than any fixed small buffer.

A trainer must see class-mixed batches whatever the layout it is given (the reader does
not trust the writer), and every writer lays out shards that mix classes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from synthaug.artifacts import commit_dataset, new_write_id, read_manifest, write_shard
from synthaug.classify.mixing import plan_mixture, real_only
from synthaug.classify.data import shuffle_rows
from synthaug.classify.train import fit_local
from synthaug.config import ClassifyConfig
from synthaug.data.images import encode_png
from synthaug.shuffle import BatchMix, blocked, blocked_shards, buffer_rows, warn_if_blocked

CLASSES, PER_CLASS, SHARD = 10, 2000, 1000


def _images(n_classes: int, per_class: int, seed: int = 0):
    """Noisy copies of one random 8x8 prototype per class: learnable in one epoch, not in a few batches."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (n_classes, 8, 8)).astype(np.float64)
    labels = np.repeat(np.arange(n_classes), per_class)
    x = protos[labels] + rng.normal(0, 70, (len(labels), 8, 8))
    return np.clip(x, 0, 255).astype(np.uint8), labels


def write_set(path, images, labels, order, shard: int, prefix: str = "r", source: str = "real") -> dict:
    """A contract dataset of the rows in ``order``, cut into shards of ``shard`` rows in that order."""
    names = [str(c) for c in range(int(labels.max()) + 1)]
    wid, entries = new_write_id(), []
    for j, a in enumerate(range(0, len(order), shard)):
        idx = order[a:a + shard]
        t = pa.table({"id": [f"{prefix}{i:06d}" for i in idx], "image": [encode_png(images[i]) for i in idx],
                      "label": pa.array(labels[idx], pa.int64()), "class_name": [names[y] for y in labels[idx]],
                      "source": [source] * len(idx)})
        entries.append(write_shard(path, wid, f"part-{j:05d}", t, names))
    return commit_dataset(path, entries, class_names=names, image_size=(8, 8), channels=1, config={}, check_ids=False)


@pytest.fixture(scope="module")
def sorted_and_shuffled(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    x, y = _images(CLASSES, PER_CLASS)
    perm = np.random.default_rng(1).permutation(len(y))
    write_set(root / "sorted", x, y, np.arange(len(y)), SHARD)  # label-sorted: every shard one class
    write_set(root / "shuffled", x, y, perm, SHARD)
    vx, vy = _images(CLASSES, 50, seed=0)[0], np.repeat(np.arange(CLASSES), 50)
    vx = np.clip(vx.astype(np.int16) + np.random.default_rng(2).integers(-3, 4, vx.shape), 0, 255).astype(np.uint8)
    write_set(root / "val", vx, vy, np.arange(len(vy)), 250, prefix="v")
    return root


def test_label_sorted_shards_train_like_shuffled(ray_session, sorted_and_shuffled, tmp_path):
    """20k rows in class-pure shards of 1,000 (bigger than 8 batches, smaller than 16 shards): one epoch
    reaches the shuffled copy's accuracy, and its batches were class-mixed."""
    root = sorted_and_shuffled
    assert len(blocked_shards(read_manifest(root / "sorted"))) == CLASSES * PER_CLASS // SHARD
    assert blocked_shards(read_manifest(root / "shuffled")) == []
    cfg = ClassifyConfig(epochs=1, batch_size=64, augment=False, warmup_epochs=0, lr=3e-3)
    kw = dict(class_names=[str(c) for c in range(CLASSES)], in_chans=1, seed=0, reporter="local")
    shuffled = fit_local(cfg, str(root / "shuffled"), str(root / "val"), **kw)
    srt = fit_local(cfg, str(root / "sorted"), str(root / "val"), **kw)
    assert shuffled["top1"] > 80, shuffled
    assert srt["top1"] >= shuffled["top1"] - 5, (srt["top1"], shuffled["top1"])
    for r in (srt, shuffled):
        assert r["batch_blocked_share"] < 0.05 and r["batch_label_entropy"] > 0.9, r
    # The data is bigger than the buffer: 16 shards of 1,000, not the whole 20,000 rows.
    assert shuffle_rows(cfg, real_only(str(root / "sorted"))) == 16_000


def test_mixture_parts_interleave_file_by_file(ray_session, sorted_and_shuffled, tmp_path):
    """A 1:1 mixture's stream alternates real and synthetic files; it is never all real, then all synthetic."""
    from synthaug.classify.data import training_dataset

    x, y = _images(CLASSES, 200, seed=3)
    write_set(tmp_path / "syn", x, y, np.random.default_rng(0).permutation(len(y)), 100, prefix="s", source="synthetic")
    spec = plan_mixture(str(sorted_and_shuffled / "shuffled"), str(tmp_path / "syn"), 0.1, seed=0)
    domains = np.concatenate([b["domain"] for b in training_dataset(spec, seed=0).iter_batches(batch_size=None)])
    assert domains.sum() == 2000 and len(domains) == 22000
    where = np.flatnonzero(domains)
    assert where.min() < 0.5 * len(domains) and where.max() > 0.5 * len(domains)  # synthetic rows in both halves


def test_blocked_batches_are_measured_and_named(capsys):
    shares = np.full(10, 0.1)
    assert blocked(np.r_[64, np.zeros(9)], shares)  # one class
    assert not blocked(np.random.default_rng(0).multinomial(64, shares), shares)  # i.i.d.
    assert not blocked(np.r_[3, 1, 1, 1, np.zeros(6)], shares)  # small batches are not flagged by chance
    mix = BatchMix(10)
    for c in range(10):
        for _ in range(5):
            mix.add(np.full(32, c))
    s = mix.summary()
    assert s["batch_blocked_share"] == 1.0 and s["batch_label_entropy"] == 0.0
    line = warn_if_blocked("classify", "/data/train", s)
    assert "/data/train" in line and line.count("\n") == 0 and line in capsys.readouterr().out
    iid = BatchMix(10)
    rng = np.random.default_rng(0)
    for _ in range(50):
        iid.add(rng.integers(0, 10, 64))
    assert iid.summary()["batch_blocked_share"] == 0.0 and iid.summary()["batch_label_entropy"] > 0.9
    assert warn_if_blocked("classify", "x", iid.summary()) is None


def test_buffer_is_sized_from_the_shards_within_its_cap():
    assert buffer_rows([1000, 1000, 10], row_bytes=64, minimum=512, cap_mb=1024) == 16_000
    assert buffer_rows([10] * 4, row_bytes=64, minimum=512, cap_mb=1024) == 512
    assert buffer_rows([1000], row_bytes=3 * 256 * 256, minimum=512, cap_mb=64) == 341  # the cap wins


# ----------------------------------------------------------------------------- writers mix classes


def _class_folder(root, classes=5, per_class=60):
    """An image folder whose listing is class by class (as torchvision's ImageFolder lays one out)."""
    from PIL import Image

    x, y = _images(classes, per_class, seed=4)
    for i, (img, c) in enumerate(zip(x, y)):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"c{c}" / f"{i:04d}.png")
    return root


def _assert_mixed(manifest: dict, min_shards: int = 2):
    assert len(manifest["shards"]) >= min_shards, manifest["shards"]
    assert blocked_shards(manifest) == [], [s.get("majority") for s in manifest["shards"]]


def test_ingest_shards_mix_classes(ray_session, tmp_path):
    """An image folder listed class by class, and a label-sorted Parquet file with small row groups,
    are written in shards that each mix the classes (chunks of 40 images: before, one class each)."""
    import pyarrow.parquet as pq

    from synthaug.config import load_config
    from synthaug.data import ingest

    folder = _class_folder(tmp_path / "folder")
    m = ingest.run(load_config(None, ["ingest.source=imagefolder", f"ingest.path={folder}", "ingest.chunk_size=40",
                                      "ingest.k_per_class=0", "ingest.val_fraction=0.1"]), str(tmp_path / "a"))
    _assert_mixed(m["train"], 6)
    x, y = _images(5, 60, seed=5)
    src = pa.table({"image": [encode_png(i) for i in x], "label": pa.array(y, pa.int64())})  # sorted by label
    pq.write_table(src, tmp_path / "sorted.parquet", row_group_size=20)
    m = ingest.run(load_config(None, ["ingest.source=parquet", f"ingest.path={tmp_path / 'sorted.parquet'}",
                                      "ingest.chunk_size=40", "ingest.k_per_class=5"]), str(tmp_path / "b"))
    _assert_mixed(m["train_full"], 4)
    _assert_mixed(m["pool"], 4)


def test_generator_stream_is_class_mixed_on_sorted_shards(sorted_and_shuffled):
    """Generator training's micro-batches (the stream every worker trains on) over class-pure shards:
    mixed with the buffer sized from the data, blocked with a fixed 1,024-row buffer."""
    import itertools

    from synthaug.config import TrainGenConfig
    from synthaug.generative import train_data

    m = read_manifest(sorted_and_shuffled / "sorted")
    locs, rows = train_data.shard_locations(str(sorted_and_shuffled / "sorted"), m)
    t = TrainGenConfig(batch_size=32)
    sized = train_data.shuffle_rows(t, rows, 1, 8)
    assert sized == 16_000

    def mix(buffer):
        got = BatchMix(CLASSES)
        stream = train_data.stream(train_data.local_source(locs), rows, 0, 0, 1, 32, buffer)
        for _ in got.watch(itertools.islice(stream, len(m["shards"]) * SHARD // 32), label=lambda b: b[1]):
            pass
        return got.summary()

    assert mix(sized)["batch_blocked_share"] < 0.05
    assert mix(t.shuffle_buffer)["batch_blocked_share"] > 0.5  # what a fixed small buffer gave
