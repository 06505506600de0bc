"""Seeded per-row keys, and the k smallest keys per class: the one place synthaug derives them.

A row's key is a pure function of (domain, seed, its id string): a keyed blake2b of the id
under ``synthaug-<domain>-<seed>``, read as little-endian uint64 words (:func:`row_keys`).
Every seeded order or choice over rows uses it, each under its own domain, so two choices
with the same seed are independent:

==========  =====================================  ==========================================
domain      id string                              what it orders or chooses
==========  =====================================  ==========================================
ingest      id (two words: ``h1``, ``h2``)         the val/test split and the k-labelled cut
layout      id                                     the order a writer lays rows out in
mixture     ``label/id``                           the synthetic rows a mixture keeps
subset      id                                     the capped feature subset (IS, KID, PR)
source      id                                     the real image an image-to-image sample starts from
sample      ``label/index``                        a sampled image's noise seed (63 bits)
==========  =====================================  ==========================================

"Keep the k smallest keys per class" has one helper per place the rows are:
:func:`smallest_per_class` over a small in-memory table (rows, exact ties by id), and
:func:`kth_smallest` over a Ray Dataset (the per-class cut key, bounded passes).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

VERSION = 2  # 2: one keyed blake2b for every domain (was sha256 or pandas' hash in four of them)
ALL = -1  # a cut meaning "every row of the class"
CANDIDATES_PER_CLASS = 256  # expected keys per class that kth_smallest's pass 2 sends to the driver
MAX_HISTOGRAM = 1 << 20  # counters per block in kth_smallest's pass 1 (classes x buckets)


def row_keys(ids, seed: int, domain: str, words: int = 1) -> np.ndarray:
    """uint64 keys of rows: blake2b(str(id), key=f"synthaug-{domain}-{seed}"), ``words`` little-endian words each.

    ``(N,)`` for one word, ``(N, words)`` otherwise; a function of (domain, seed, id) only,
    never of the rows' order or chunking.
    """
    if hasattr(ids, "to_pylist"):  # pyarrow arrays: their values, not their scalars' reprs
        ids = ids.to_pylist()
    key = f"synthaug-{domain}-{int(seed)}".encode()
    digests = b"".join(hashlib.blake2b(str(i).encode(), digest_size=8 * words, key=key).digest() for i in ids)
    out = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
    return out.reshape(-1, words) if words > 1 else out


# ----------------------------------------------------------------------------- in memory


def smallest_per_class(t: pa.Table, key: str, n: int, descending: bool = False) -> pa.Table:
    """Per ``label``, the ``n`` rows of ``t`` with the smallest (or largest) ``(key, id)``."""
    if not len(t):
        return t
    order = "descending" if descending else "ascending"
    t = t.sort_by([("label", "ascending"), (key, order), ("id", order)])
    lab = t.column("label").to_numpy()
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    rank = np.arange(len(lab)) - np.repeat(starts, np.diff(np.r_[starts, len(lab)]))
    return t.filter(pa.array(rank < n))


# ----------------------------------------------------------------------------- over a Ray Dataset


def _bits(have: dict[int, int], labels: list[int]) -> int:
    """Histogram buckets (as bits of u) so that about CANDIDATES_PER_CLASS keys land in a class's cut bucket."""
    biggest = max(have[c] for c in labels)
    bits = max(0, math.ceil(math.log2(max(biggest / CANDIDATES_PER_CLASS, 1.0))))
    cap = max(0, int(math.floor(math.log2(MAX_HISTOGRAM / max(len(labels), 1)))))
    return min(bits, cap, 16)


def _histogram(batch: pa.Table, key_fn, labels: list, bits: int) -> dict:
    """Ray Data map fn: per-block counts of u's top ``bits`` bits per label, flattened (labels x buckets)."""
    index = {c: i for i, c in enumerate(labels)}
    lab, u = key_fn(batch)
    row = np.asarray([index.get(int(c), -1) for c in lab], dtype=np.int64)
    ok = row >= 0
    flat = row[ok] * (1 << bits) + (u[ok] >> np.uint64(64 - bits)).astype(np.int64)
    return {"hist": [np.bincount(flat, minlength=len(labels) << bits).astype(np.int64)]}


def _candidates(batch: pa.Table, key_fn, bucket: dict, bits: int) -> dict:
    """Ray Data map fn: the keys u of label c that fall into c's cut bucket."""
    lab, u = key_fn(batch)
    want = np.asarray([bucket.get(int(c), -1) for c in lab], dtype=np.int64)
    top = (u >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(u), np.int64)
    keep = (want >= 0) & (top == want)
    return {"label": lab[keep], "u": u[keep]}


def kth_smallest(ds, need: dict[int, int], have: dict[int, int], key_fn) -> dict[int, int]:
    """label -> the ``need[c]``-th smallest uint64 key of label c's rows in ``ds`` (ALL when that is every row).

    Rows with ``key <= cut[label]`` are the class's ``need[c]`` smallest (mixtures,
    pseudo-label selection, the capped feature subset). ``key_fn(batch) -> (labels, keys)`` runs in Ray tasks. Exact and bounded:
    pass 1 sums per-block histograms of the keys' top bits per class (``MAX_HISTOGRAM``
    counters at most); pass 2 sends the driver only the keys in each class's cut bucket
    (about ``CANDIDATES_PER_CLASS`` per class, for uniform keys). ``have[c]`` is class c's
    row count in ``ds``.
    """
    out = {c: ALL for c, n in need.items() if n == have[c]}
    labels = sorted(c for c, n in need.items() if 0 < n < have[c])
    if not labels:
        return out
    bits = _bits(have, labels)
    buckets = 1 << bits

    # Pass 1: where each class's cut falls.
    if bits:
        hist = np.zeros(len(labels) * buckets, np.int64)
        for b in ds.map_batches(_histogram, fn_kwargs=dict(key_fn=key_fn, labels=labels, bits=bits),
                                batch_format="pyarrow", batch_size=None).iter_batches(batch_size=1, batch_format="numpy"):
            hist += np.asarray(b["hist"][0], np.int64)
        hist = hist.reshape(len(labels), buckets)
    else:
        hist = np.asarray([[have[c]] for c in labels], np.int64)
    cum = np.cumsum(hist, axis=1)  # (labels, buckets)
    bucket, below = {}, {}
    for i, c in enumerate(labels):
        b = int(np.searchsorted(cum[i], need[c]))  # first bucket whose running count reaches n_c
        bucket[c], below[c] = b, int(cum[i, b - 1]) if b else 0

    # Pass 2: the keys in the cut buckets; the cut is the (n_c - below)-th of them.
    found: dict[int, list] = {c: [] for c in labels}
    for b in ds.map_batches(_candidates, fn_kwargs=dict(key_fn=key_fn, bucket=bucket, bits=bits),
                            batch_format="pyarrow", batch_size=None).iter_batches(batch_format="numpy"):
        for c in np.unique(b["label"]):
            found[int(c)].append(np.asarray(b["u"])[b["label"] == c])
    for c in labels:
        u = np.sort(np.concatenate(found[c])) if found[c] else np.zeros(0, np.uint64)
        k = need[c] - below[c]
        if not 0 < k <= len(u):
            raise RuntimeError(f"k-th smallest key of label {c}: {len(u)} candidate keys, need the {k}-th "
                               f"(the data changed while planning?)")
        out[c] = int(u[k - 1])
    return out
