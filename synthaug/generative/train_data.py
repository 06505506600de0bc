"""The training data stream of generator training: per rank, per epoch, deterministic, never materialised.

Epoch ``e`` of a run with seed ``s`` on ``W`` workers:

1. The dataset's shards (as its manifest lists them, with their row counts) are put in
   a seeded order, ``permutation(seed=(s, e))``. Concatenated, they form the epoch's
   row sequence, of ``N`` rows.
2. Rank ``r`` takes rows ``[r L, (r + 1) L)`` of it, ``L = N // W``: it reads only the
   shards that overlap its range (decoded in Ray Data ``map_batches`` tasks, anywhere in
   the cluster) and drops the rows of the boundary shards that belong to its neighbours.
3. Its rows pass through a local shuffle buffer (:func:`shuffle_rows`: 16 of the largest
   shards, at least ``shuffle_buffer`` rows, within ``shuffle_buffer_mb``; seeded by
   ``(s, e, r)``) and come out as micro-batches of ``micro`` rows, class-mixed even on a
   set written class by class; the last partial one
   is dropped, so every rank yields ``L // micro`` micro-batches per epoch.

Every step is a function of (seed, epoch, rank, world size) and the manifest, not of
Ray Data's block sizes or timing, so a restarted worker group can skip exactly the
micro-batches it had consumed (re-reading and discarding them), and a plain loop over
:func:`local_source` sees the same batches as a 1-worker Ray run over :func:`ray_source`.
Images stay uint8 (B, C, H, W) until the trainer converts the micro-batch; a latent cache's
rows come as float32 VAE moments (``latent_shape``).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

import numpy as np

from synthaug import storage
from synthaug.data.images import decode_batch

COLUMNS = ["id", "image", "label"]
Batch = tuple[np.ndarray, np.ndarray]  # uint8 (B, C, H, W), int64 (B,)
Source = Callable[[list[int]], Iterable[Batch]]  # shard indices, in order -> their decoded rows, in order


def decode(batch: dict, latent_shape=None) -> dict:
    """Ray Data ``map_batches``: PNG bytes -> uint8 (B, C, H, W) and int64 labels.

    With ``latent_shape`` (a latent cache, :mod:`synthaug.generative.latent_cache`) the
    bytes are VAE moments: float32 (B, *latent_shape).
    """
    if latent_shape is not None:
        from synthaug.generative.latent_cache import decode_moments

        x = decode_moments(batch["image"], latent_shape)
    else:
        x = decode_batch(batch["image"], batch.get("id"))
    return {"x": x, "y": np.asarray(batch["label"], dtype=np.int64)}


def shuffle_rows(t, shard_rows: list[int], channels: int, image_size: int) -> int:
    """A worker's local shuffle buffer: 16 of the dataset's largest shards, at least ``shuffle_buffer`` rows,
    within ``shuffle_buffer_mb`` of decoded uint8 images (``synthaug.shuffle.buffer_rows``)."""
    from synthaug.shuffle import buffer_rows

    return buffer_rows(shard_rows, int(channels) * int(image_size) ** 2, minimum=t.shuffle_buffer,
                       cap_mb=t.shuffle_buffer_mb)


def per_epoch(total_rows: int, world: int, micro: int) -> int:
    """Micro-batches each rank yields per epoch."""
    return (total_rows // world) // micro


def epoch_slice(shard_rows: list[int], seed: int, epoch: int, rank: int, world: int) -> tuple[list[int], int, int]:
    """(shard indices to read in order, rows to drop from their start, rows to keep) for one rank and epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_rows))
    take = sum(shard_rows) // world
    start, end = rank * take, (rank + 1) * take
    picked, skip, offset = [], 0, 0
    for i in order:
        n = shard_rows[i]
        if n and offset < end and offset + n > start:
            if not picked:
                skip = start - offset
            picked.append(int(i))
        offset += n
    return picked, skip, take


def _slice(batches: Iterable[Batch], skip: int, take: int) -> Iterator[Batch]:
    """Rows ``[skip, skip + take)`` of a stream of batches."""
    for x, y in batches:
        if take <= 0:
            return
        if skip >= len(y):
            skip -= len(y)
            continue
        x, y = x[skip:skip + take], y[skip:skip + take]
        skip, take = 0, take - len(y)
        yield x, y


def shuffled(batches: Iterable[Batch], micro: int, capacity: int, rng: np.random.Generator) -> Iterator[Batch]:
    """Micro-batches of ``micro`` rows drawn from a local shuffle buffer of ``capacity`` rows.

    When the buffer is full, ``micro`` random rows leave it and the last rows move into
    their slots; at the end the rest leaves in a random order (the last partial batch is
    dropped). The output depends only on the row sequence, not on how it is batched.
    """
    capacity = max(capacity, micro)
    xbuf = ybuf = None
    n = 0
    for x, y in batches:
        i = 0
        while i < len(y):
            if xbuf is None:
                xbuf = np.empty((capacity, *x.shape[1:]), x.dtype)
                ybuf = np.empty((capacity,), y.dtype)
            k = min(capacity - n, len(y) - i)
            xbuf[n:n + k], ybuf[n:n + k] = x[i:i + k], y[i:i + k]
            n, i = n + k, i + k
            if n == capacity:
                idx = np.sort(rng.choice(capacity, micro, replace=False))
                yield xbuf[idx].copy(), ybuf[idx].copy()
                # Fill the holes below the tail with the tail's rows that stay.
                tail = capacity - micro
                holes = idx[idx < tail]
                movers = np.setdiff1d(np.arange(tail, capacity), idx)
                xbuf[holes], ybuf[holes] = xbuf[movers], ybuf[movers]
                n = tail
    if n:
        perm = rng.permutation(n)
        for j in range(0, n - micro + 1, micro):
            sel = perm[j:j + micro]
            yield xbuf[sel].copy(), ybuf[sel].copy()


def epoch_batches(source: Source, shard_rows: list[int], seed: int, epoch: int, rank: int, world: int,
                  micro: int, shuffle_buffer: int) -> Iterator[Batch]:
    """One rank's micro-batches of one epoch."""
    order, skip, take = epoch_slice(shard_rows, seed, epoch, rank, world)
    rng = np.random.default_rng([seed, epoch, rank, 1])
    return shuffled(_slice(source(order), skip, take), micro, shuffle_buffer, rng)


def stream(source: Source, shard_rows: list[int], seed: int, rank: int, world: int, micro: int,
           shuffle_buffer: int, start: int = 0) -> Iterator[Batch]:
    """One rank's micro-batches over epochs 0, 1, ..., from micro-batch ``start`` on (endless).

    A resumed run passes the micro-batches already consumed (``step x grad_accum``): the
    epoch they fall in is re-read and its first ones are discarded.
    """
    m = per_epoch(sum(shard_rows), world, micro)
    if m == 0:
        raise ValueError(f"{sum(shard_rows)} rows make no micro-batch of {micro} on each of {world} workers")
    first, skip = divmod(start, m)
    for epoch in itertools.count(first):
        batches = epoch_batches(source, shard_rows, seed, epoch, rank, world, micro, shuffle_buffer)
        yield from itertools.islice(batches, skip if epoch == first else 0, None)


# ----------------------------------------------------------------------------- sources


def shard_locations(data_loc: str, manifest: dict) -> tuple[list[str], list[int]]:
    """The locations of a dataset's shards and their row counts, in manifest order."""
    return [storage.join(data_loc, s["path"]) for s in manifest["shards"]], [int(s["rows"]) for s in manifest["shards"]]


def read_shards(locations: list[str], latent_shape=None):
    """Shards (same storage) as one Ray Dataset of decoded rows, in the order given (no shuffle)."""
    import ray.data

    fs, _ = storage.resolve(locations[0])
    ds = ray.data.read_parquet([storage.resolve(loc)[1] for loc in locations], filesystem=fs)
    ds = ds.select_columns(COLUMNS).map_batches(decode, batch_format="numpy", fn_kwargs={"latent_shape": latent_shape})
    ds.context.execution_options.preserve_order = True  # the rows in file order, whatever the task timing
    ds.context.enable_progress_bars = False  # one pipeline per rank and epoch: bars would flood the worker logs
    return ds


def _numpy_batches(ds) -> Iterator[Batch]:
    for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        yield b["x"], b["y"]


def ray_source(locations: list[str], cached: list | None = None, latent_shape=None) -> Source:
    """Reads the given shards through Ray Data, or with ``cached`` (:func:`cache`) fetches their decoded blocks."""

    def source(order: list[int]) -> Iterator[Batch]:
        if not order:
            return
        if cached is not None:
            import ray

            for i in order:
                for ref in cached[i]:  # one block at a time, no pipeline to start per epoch
                    b = ray.get(ref)
                    yield b["x"], b["y"]
        else:
            yield from _numpy_batches(read_shards([locations[i] for i in order], latent_shape))

    return source


def cache(locations: list[str], latent_shape=None) -> list[list]:
    """Every shard decoded once into the Ray object store: per shard, its blocks' refs in row order.

    The blocks are made by Ray tasks; the driver holds only the references (which keep
    them alive while it runs). For sets that fit in the object store.
    """
    return [read_shards([loc], latent_shape).materialize().to_numpy_refs() for loc in locations]


def local_source(locations: list[str], batch_size: int = 256, latent_shape=None) -> Source:
    """Reads and decodes the given shards in this process (Ray-free; the plain loop's source)."""
    import pyarrow.parquet as pq

    def source(order: list[int]) -> Iterator[Batch]:
        for i in order:
            fs, path = storage.resolve(locations[i])
            with fs.open_input_file(path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "label"]):
                    d = decode({"image": rb.column("image").to_pylist(), "label": rb.column("label").to_numpy()},
                               latent_shape)
                    yield d["x"], d["y"]

    return source
