"""The classifier's input pipelines in Ray Data: a mixture to decoded batches, val to shards.

* ``training_dataset(spec, ...)``: the mixture's Parquet shards (``mixing.mixture_dataset``),
  read in a seeded, per-execution file order, decoded to uint8 in ``map_batches``. It is
  lazy: each epoch streams it again (one Ray Data execution per epoch), so no process
  holds the decoded set. ``cache=True`` (``classify.cache``) materialises it once in the
  object store instead, for sets that fit.
* ``iterate``: an epoch's batches from a worker's streaming shard, shuffled by a local
  buffer seeded from (seed, epoch, rank, pass) and augmented by ``TrainCollate``. The
  buffer holds 16 of the mixture's largest shards (``shuffle_rows``, within
  ``classify.shuffle_buffer_mb``): with the per-execution file order, which interleaves
  the mixture's parts file by file, a set written class by class still gives
  class-mixed batches (``synthaug.shuffle``)
  (``iter_torch_batches(collate_fn=...)``, in Ray Data's prefetch thread).
* ``val_dataset(val_dir, rank, world)``: this worker's share of the val split -- the rows
  whose ``id_hashes(id) % world == rank`` -- streamed and decoded in the worker with
  pyarrow (no Ray Data execution per evaluation).
  Every row lands on exactly one worker, so the summed counts are exact.

Each training row carries ``key = id_hashes(id)``: the per-sample augmentation seed comes
from it, never from a row's position, so it does not depend on shards, order or workers.
Row order is made deterministic (``preserve_order``) for bit-reproducible runs.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import NumpyBatchCollateFn

from synthaug.artifacts import id_hashes
from synthaug.config import ClassifyConfig
from synthaug.data.images import decode_batch, to_float


def _images(batch: pa.Table, chw) -> np.ndarray:
    """uint8 (B, C, H, W); an empty batch (a block the mixture filtered out) keeps the shape."""
    if batch.num_rows == 0 and chw is not None:
        return np.zeros((0, *map(int, chw)), np.uint8)
    return decode_batch(batch.column("image").to_pylist(), batch.column("id").to_pylist())


def decode_to_uint8(batch: pa.Table, chw=None) -> dict:
    """Ray Data map fn: base rows -> uint8 image (B, C, H, W), label, domain (True = synthetic), key."""
    ids = batch.column("id").to_numpy(zero_copy_only=False)
    return {
        "image": _images(batch, chw),
        "label": batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64),
        "domain": np.asarray(batch.column("source").to_pylist()) == "synthetic",
        "key": id_hashes(ids),
    }


def _decode_val(batch: pa.Table, rank: int, world: int, chw) -> dict:
    """Ray Data map fn: this rank's val rows, decoded to float in [-1, 1]."""
    if world > 1:
        mine = (id_hashes(batch.column("id").to_numpy(zero_copy_only=False)) % np.uint64(world)) == np.uint64(rank)
        batch = batch.filter(pa.array(mine))
    return {"image": to_float(_images(batch, chw)),
            "label": batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)}


def _ordered(ds):
    """Deterministic row order for this dataset's executions (reproducible runs)."""
    ds.context.execution_options.preserve_order = True
    return ds


def training_dataset(spec, *, seed: int, cache: bool = False):
    """The decoded mixture as a Ray Dataset (lazy, or materialised with ``cache``)."""
    from ray.data import FileShuffleConfig

    from synthaug.classify.mixing import mixture_dataset

    # File order: seeded, and different for each execution (epoch / pass) of the dataset.
    ds = mixture_dataset(spec, shuffle=FileShuffleConfig(seed=int(seed) % (2**31), reseed_after_execution=True))
    chw = (spec.channels, *spec.image_size)
    ds = _ordered(ds.map_batches(decode_to_uint8, fn_kwargs={"chw": chw}, batch_format="pyarrow", batch_size=256))
    return ds.materialize() if cache else ds


class ValShare:
    """This rank's share of the val split, streamed in the worker itself (pyarrow, shard by shard).

    ``iter_batches(batch_size)`` yields numpy ``{"image": float (B, C, H, W), "label"}``
    batches of the rows whose id hash falls to this rank, reading the manifest's shards
    with ``artifacts.iter_batches`` (bounded memory). No Ray Data execution is started:
    measured here, each one cost ~3 s of fixed time per evaluation for 580 rows.
    ``materialize()`` keeps the decoded share in the worker's memory (``classify.cache``).
    """

    def __init__(self, val_dir: str, rank: int = 0, world: int = 1):
        from synthaug.artifacts import read_manifest

        m = read_manifest(val_dir)
        self.val_dir, self.rank, self.world = val_dir, int(rank), int(world)
        self.chw = (int(m["channels"]), *map(int, m["image_size"]))
        self._cached: list[dict] | None = None

    def iter_batches(self, batch_size: int = 256, batch_format: str = "numpy") -> Iterable[dict]:
        from synthaug.artifacts import iter_batches

        if self._cached is not None:
            yield from self._cached
            return
        for b in iter_batches(self.val_dir, columns=["id", "image", "label"], batch_size=batch_size):
            yield _decode_val(pa.Table.from_batches([b]), self.rank, self.world, self.chw)

    def materialize(self) -> "ValShare":
        self._cached = [b for b in self.iter_batches() if len(b["label"])]
        return self


def val_dataset(val_dir: str, rank: int = 0, world: int = 1) -> ValShare:
    """This rank's share of the val split, decoded lazily (``iter_batches``: image float, label)."""
    return ValShare(val_dir, rank, world)


def val_batches(ds, batch_size: int = 256) -> Iterable[dict]:
    """Stream a ``val_dataset`` in numpy batches (never the whole split at once)."""
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        if len(b["label"]):
            yield b


def shuffle_rows(cfg: ClassifyConfig, spec) -> int:
    """Rows of a worker's local shuffle buffer for a mixture: 16 of its largest shards (at least 8 batches),
    within ``classify.shuffle_buffer_mb`` of decoded uint8 rows (``synthaug.shuffle.buffer_rows``)."""
    from synthaug.classify.mixing import shard_rows
    from synthaug.shuffle import buffer_rows

    row_bytes = int(spec.channels) * int(np.prod(spec.image_size))
    return buffer_rows(shard_rows(spec), row_bytes, minimum=max(256, 8 * cfg.batch_size), cap_mb=cfg.shuffle_buffer_mb)


def iterate(data, steps: int, cfg: ClassifyConfig, *, batch_size: int, seed: int, epoch: int, rank: int,
            in_chans: int, image_size, buffer_rows: int | None = None) -> Iterable[dict]:
    """``steps`` batches of one epoch from a Ray Data shard or dataset, augmented by ``TrainCollate``.

    ``buffer_rows``: the local shuffle buffer (:func:`shuffle_rows`); None keeps 8 batches.
    """
    # torch (via augment) is imported here, in the Train worker, not where this module is
    # unpickled: Ray Data's read tasks and Train's controller import it for decode_to_uint8.
    from synthaug.classify.augment import TrainCollate, _seed

    return _take(data, steps, dict(
        batch_size=batch_size,
        collate_fn=TrainCollate(cfg, in_chans, image_size, seed, epoch),
        local_shuffle_buffer_size=int(buffer_rows or max(256, 8 * batch_size)),
        local_shuffle_seed=_seed(seed, epoch, rank, 3) % (2**31),
    ))


class _Recorder(NumpyBatchCollateFn):
    """A ``collate_fn`` wrapper that keeps the raw rows of one pass while they fit in ``cap`` rows.

    Ray Data calls it in its prefetch thread; ``rows()`` is read after the pass has ended.
    """

    def __init__(self, collate, cap: int):
        self.collate, self.cap, self.batches, self.n, self.full = collate, int(cap), [], 0, False

    def __call__(self, batch: dict):
        if not self.full:
            self.n += len(batch["label"])
            self.full = self.n > self.cap
            if self.full:
                self.batches = []
            else:
                self.batches.append({k: np.asarray(v).copy() for k, v in batch.items()})
        return self.collate(batch)

    def rows(self) -> dict | None:
        if self.full or not self.batches:
            return None
        rows = {k: np.concatenate([b[k] for b in self.batches]) for k in self.batches[0]}
        order = np.lexsort((rows["label"], rows["key"]))  # canonical: collate calls may run out of order
        return {k: v[order] for k, v in rows.items()}


def _for_pass(collate, passes: int):
    """The collate of the ``passes``-th pass over the shard (``TrainCollate.for_pass``: fresh draws)."""
    return collate.for_pass(passes) if hasattr(collate, "for_pass") else collate


def _replay(rows: dict, kwargs: dict, passes: int):
    """One more pass over a recorded shard, from memory: a seeded permutation, the pass's collate."""
    from synthaug.classify.augment import _seed

    n, bs = len(rows["label"]), int(kwargs["batch_size"])
    order = np.random.default_rng(_seed(kwargs["local_shuffle_seed"], passes)).permutation(n)
    collate = _for_pass(kwargs["collate_fn"], passes)
    for i in range(0, n, bs):
        yield collate({k: v[order[i:i + bs]] for k, v in rows.items()})


def _take(data, steps: int, kwargs: dict):
    """Exactly ``steps`` batches: passes over the shard (each reshuffled) until the count is met.

    The first pass streams the shard (one Ray Data execution). When the epoch needs more passes
    and that pass fitted in the local shuffle buffer (``local_shuffle_buffer_size`` rows, the
    memory the stream was allowed anyway), later passes replay its rows from memory in a seeded
    order instead of starting another execution (~1.7 s each here; a 100-image train set with
    2,048-image epochs needed 20 per epoch). Larger shards stream again, pass by pass.
    """
    done, passes, rows = 0, 0, None
    while done < steps:
        if rows is not None:
            stream = _replay(rows, kwargs, passes)
        else:
            kw = dict(kwargs, local_shuffle_seed=(kwargs["local_shuffle_seed"] + passes) % (2**31),
                      collate_fn=_for_pass(kwargs["collate_fn"], passes))
            recorder = _Recorder(kw["collate_fn"], kw["local_shuffle_buffer_size"]) if passes == 0 else None
            if recorder is not None:
                kw["collate_fn"] = recorder
            stream = data.iter_torch_batches(**kw)
        got = 0
        for batch in stream:
            yield batch
            done, got = done + 1, got + 1
            if done >= steps:
                return
        if got == 0:
            return
        if passes == 0 and recorder is not None:
            rows = recorder.rows()
        passes += 1
