"""Seeded row keys and the k smallest keys per class (synthaug.keys), against independent references."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from synthaug.keys import row_keys, smallest_per_class


def test_row_keys_are_keyed_blake2b_of_the_id_per_domain_and_seed():
    ids = [f"img-{i}" for i in range(50)]
    k = row_keys(ids, 7, "layout")
    want = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=b"synthaug-layout-7").digest(), "little")
            for i in ids]
    assert k.dtype == np.uint64 and k.tolist() == want
    # A function of (domain, seed, id) only: order and chunking do not matter.
    assert (row_keys(ids[::-1], 7, "layout") == k[::-1]).all() and (row_keys(ids[5:9], 7, "layout") == k[5:9]).all()
    assert (row_keys(pa.array(ids), 7, "layout") == k).all()
    # Other seeds and other domains draw independent keys.
    assert (row_keys(ids, 8, "layout") != k).all() and (row_keys(ids, 7, "mixture") != k).all()
    two = row_keys(ids, 7, "layout", words=2)
    assert two.shape == (50, 2) and row_keys([], 0, "x").shape == (0,)


def test_smallest_per_class_keeps_the_n_smallest_key_then_id():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    key = rng.integers(0, 5, 200).astype(np.uint64)  # many ties: broken by id
    ids = [f"r{i:03d}" for i in range(200)]
    t = pa.table({"label": labels, "k": key, "id": ids})
    for n, desc in ((3, False), (1, True), (500, False)):
        got = smallest_per_class(t, "k", n, descending=desc)
        for c in range(4):
            rows = sorted(((int(k), i) for y, k, i in zip(labels, key, ids) if y == c), reverse=desc)[:n]
            mine = [(int(k), i) for y, k, i in zip(*(got.column(x).to_pylist() for x in ("label", "k", "id"))) if y == c]
            assert mine == rows
