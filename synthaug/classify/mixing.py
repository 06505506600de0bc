"""Real + synthetic training mixtures as a Ray Data operation: a plan, then a filtered read.

The mixing model (Azizi et al. 2023 train on real plus a multiple of it in synthetic):

* ``ratio`` r >= 0 adds ``round(r * |real|)`` synthetic images to all the real ones.
* The synthetic part is class-balanced like the real part: class c gets n_c = r x (its
  real count), rounded by largest remainder so that the shares add up to exactly
  ``round(r * |real|)`` (ties go to the lower label).
* Every synthetic row gets a key ``u = hash(seed, label, id)`` (``keys.row_keys``).
  Class c keeps its n_c rows with the smallest u: drawn without replacement, seeded, and
  nested -- with the same seed, the rows for a smaller r are a subset of those for a
  larger r (a ratio sweep changes only how much synthetic data there is, not which).
  The choice depends only on the rows' (id, label), never on shards or row order.
* r = 0 is the real set alone; ``synthetic_only`` keeps only the synthetic part, sized as
  for r (or every synthetic row when r = 0).
* ``extra`` (optional) is a labelled set added whole, e.g. the pseudo-labelled pool
  rows (``synthaug.classify.pseudolabel``). It does not count as real: an epoch stays
  ``|real|`` images, so labelled + pseudo-labelled (+ synthetic) training gets the same
  optimiser steps as real-only, as a synthetic ratio does.

Two steps, so that no process holds a dataset:

1. ``plan_mixture`` (driver) checks the inputs from the manifests alone (class names,
   enough synthetic rows per class: clear errors naming the class, before any training),
   then finds each class's cut-off key with a bounded Ray Data computation over the
   ``(id, label)`` columns (``thresholds``, through ``keys.kth_smallest``). It returns a small JSON-able ``Mixture``.
2. ``mixture_dataset(spec)`` is the lazy Ray Dataset of the mixture's base columns: the
   real shards plus the synthetic shards filtered by ``u <= threshold[label]``.

The output keeps the contract's base columns only (``id, image, label, class_name,
source``); provenance columns of the synthetic set stay in its own dataset.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pyarrow as pa

from synthaug.artifacts import BASE_COLUMNS, BASE_SCHEMA, read_manifest
from synthaug.errors import InputValueError
from synthaug.keys import ALL, kth_smallest, row_keys



@dataclasses.dataclass(frozen=True)
class Mixture:
    """A training mixture by location: what ``mixture_dataset`` reads. JSON-able (``to_json``)."""

    real: str | None  # real rows (all of them); None when synthetic_only
    synthetic: str | None  # synthetic dataset location, None for real-only
    thresholds: dict  # label -> max key kept (ALL: every row; absent: none)
    counts: dict  # label -> synthetic rows kept
    seed: int
    ratio: float
    synthetic_only: bool
    n_real: int
    class_names: tuple
    image_size: tuple
    channels: int
    extra: str | None = None  # a labelled set added whole (pseudo-labelled pool rows); not counted in n_real
    n_extra: int = 0

    @property
    def n_synthetic(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def num_rows(self) -> int:
        return self.n_real + self.n_synthetic + self.n_extra

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Mixture":
        d = json.loads(text)
        d["thresholds"] = {int(k): int(v) for k, v in d["thresholds"].items()}
        d["counts"] = {int(k): int(v) for k, v in d["counts"].items()}
        return cls(**{**d, "class_names": tuple(d["class_names"]), "image_size": tuple(d["image_size"])})


# ----------------------------------------------------------------------------- arithmetic


def per_class_counts(real_labels: np.ndarray, ratio: float) -> dict[int, int]:
    """Synthetic rows per label: r x real count, largest-remainder rounded to round(r |real|)."""
    labels, counts = np.unique(real_labels, return_counts=True)
    return _largest_remainder(dict(zip(labels.tolist(), counts.tolist())), ratio)


def _largest_remainder(real_counts: dict[int, int], ratio: float) -> dict[int, int]:
    labels = np.asarray(sorted(real_counts), dtype=np.int64)
    counts = np.asarray([real_counts[int(k)] for k in labels], dtype=np.float64)
    exact = ratio * counts
    base = np.floor(exact).astype(np.int64)
    missing = int(round(ratio * counts.sum())) - int(base.sum())
    # Largest fractional part first; a stable sort gives ties to the lower label.
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:max(missing, 0)]] += 1
    return {int(k): int(n) for k, n in zip(labels, base)}


def keys(ids, labels, seed: int) -> np.ndarray:
    """uint64 key u = hash(seed, label, id) of each row (``keys.row_keys``): the order in which a class's rows are drawn."""
    ids = ids.to_pylist() if hasattr(ids, "to_pylist") else list(ids)
    labels = labels.to_pylist() if hasattr(labels, "to_pylist") else np.asarray(labels, dtype=np.int64).tolist()
    return row_keys([f"{int(y)}/{i}" for y, i in zip(labels, ids)], seed, "mixture")


# ----------------------------------------------------------------------------- plan


def _check_classes(real_m: dict, syn_m: dict, where: str) -> None:
    r, s = list(real_m["class_names"]), list(syn_m["class_names"])
    if sorted(r) != sorted(s):
        raise InputValueError(f"{where}: class names {sorted(s)} do not match the real class names {sorted(r)}")
    if r != s:
        bad = [n for i, n in enumerate(r) if s.index(n) != i]
        pairs = ", ".join(f"{n!r}: real {r.index(n)} vs {s.index(n)}" for n in bad)
        raise InputValueError(f"{where}: labels differ from the real ones for class {pairs}")


def plan_mixture(real: str, synthetic: str | None, ratio: float, seed: int, synthetic_only: bool = False,
                 extra: str | None = None) -> Mixture:
    """Check the inputs from their manifests and fix which synthetic rows the mixture keeps.

    ``extra``: a labelled contract dataset whose rows are all added (see the module docstring).
    """
    spec = _plan(real, synthetic, ratio, seed, synthetic_only)
    if extra is None:
        return spec
    if synthetic_only:
        raise InputValueError("a synthetic-only mixture (CAS) takes no extra set")
    extra_m = read_manifest(extra)
    _check_classes(read_manifest(real), extra_m, f"extra set {extra}")
    return dataclasses.replace(spec, extra=str(extra), n_extra=int(extra_m["num_rows"]))


def _plan(real: str, synthetic: str | None, ratio: float, seed: int, synthetic_only: bool) -> Mixture:
    ratio = float(ratio)
    if not np.isfinite(ratio) or ratio < 0:
        raise InputValueError(f"mixing ratio must be >= 0, got {ratio}")
    real_m = read_manifest(real)
    if int(real_m["num_rows"]) == 0:
        raise InputValueError(f"{real}: real set is empty; a mixture needs real images to size the synthetic part")
    names = list(real_m["class_names"])
    uses_synthetic = ratio > 0 or synthetic_only
    if uses_synthetic and synthetic is None:
        raise InputValueError(f"ratio {ratio} (synthetic_only={synthetic_only}) needs a synthetic set, got None")
    syn_m = read_manifest(synthetic) if synthetic is not None and uses_synthetic else None
    if syn_m is not None:
        _check_classes(real_m, syn_m, f"synthetic set {synthetic}")
    base = dict(seed=int(seed), ratio=ratio, synthetic_only=bool(synthetic_only), class_names=tuple(names),
                image_size=tuple(int(v) for v in real_m["image_size"]), channels=int(real_m["channels"]))
    n_real = 0 if synthetic_only else int(real_m["num_rows"])
    real_loc = None if synthetic_only else str(real)
    if syn_m is None:
        return Mixture(real=real_loc, synthetic=None, thresholds={}, counts={}, n_real=n_real, **base)

    have = {i: int(syn_m["counts"].get(n, 0)) for i, n in enumerate(names)}
    if synthetic_only and ratio == 0:  # every synthetic row
        return Mixture(real=None, synthetic=str(synthetic), thresholds={c: ALL for c, n in have.items() if n},
                       counts={c: n for c, n in have.items() if n}, n_real=0, **base)
    real_counts = {i: int(real_m["counts"].get(n, 0)) for i, n in enumerate(names)}
    need = {c: n for c, n in _largest_remainder({c: n for c, n in real_counts.items() if n}, ratio).items() if n}
    for c, n in need.items():
        if n > have[c]:
            raise InputValueError(f"class {names[c]!r} (label {c}): ratio {ratio} needs {n} synthetic images, "
                             f"the synthetic set {synthetic} has {have[c]}")
    return Mixture(real=real_loc, synthetic=str(synthetic), thresholds=thresholds(synthetic, need, have, seed),
                   counts=need, n_real=n_real, **base)


# ----------------------------------------------------------------------------- thresholds


def mixture_keys(batch: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, u) of a batch: the key by which a mixture draws a class's synthetic rows."""
    lab = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return lab, keys(batch.column("id"), batch.column("label"), seed)


def thresholds(synthetic: str, need: dict[int, int], have: dict[int, int], seed: int) -> dict[int, int]:
    """label -> the n_c-th smallest mixture key of that class in ``synthetic`` (ALL when every row is kept)."""
    import functools

    from synthaug.artifacts import read_ray

    return kth_smallest(read_ray(synthetic, columns=["id", "label"]), need, have,
                        functools.partial(mixture_keys, seed=int(seed)))


# ----------------------------------------------------------------------------- the dataset


def _keep_synthetic(batch: pa.Table, spec: Mixture) -> pa.Table:
    """Ray Data map fn: the base columns of the synthetic rows the mixture keeps."""
    return _base(batch.filter(pa.array(_keep_mask(batch, spec))))


def _keep_mask(batch: pa.Table, spec: Mixture) -> np.ndarray:
    """Which synthetic rows of ``batch`` the mixture keeps."""
    n = len(spec.class_names)
    cut, every, kept = np.zeros(n, np.uint64), np.zeros(n, bool), np.zeros(n, bool)
    for c, t in spec.thresholds.items():
        kept[int(c)] = True
        if int(t) == ALL:
            every[int(c)] = True
        else:
            cut[int(c)] = np.uint64(int(t))
    lab, u = mixture_keys(batch, spec.seed)
    return kept[lab] & (every[lab] | (u <= cut[lab]))


def _base(table: pa.Table) -> pa.Table:
    return table.select(list(BASE_COLUMNS)).cast(BASE_SCHEMA)


def parts(spec: Mixture | Any) -> list[tuple[str, str]]:
    """``(part, location)`` of each set the mixture reads: 'real', 'synthetic' (filtered by key), 'extra'."""
    parts = []
    if spec.real is not None:
        parts.append(("real", spec.real))
    if spec.synthetic is not None and spec.thresholds:
        parts.append(("synthetic", spec.synthetic))
    if getattr(spec, "extra", None) is not None and spec.n_extra:
        parts.append(("extra", spec.extra))
    if not parts:
        raise InputValueError("the mixture has no rows")
    return parts


def shard_rows(spec: Mixture | Any) -> list[int]:
    """Rows of every shard the mixture reads (from the manifests; the synthetic part's before its filter)."""
    return [int(s["rows"]) for _, loc in parts(spec) for s in read_manifest(loc)["shards"]]


def _select(batch: pa.Table, spec: Mixture, synthetic_paths: frozenset) -> pa.Table:
    """Ray Data map fn over rows read with their file path: base columns, the synthetic part filtered by key."""
    paths = batch.column("path").to_numpy(zero_copy_only=False)
    syn = np.fromiter((p in synthetic_paths for p in paths), bool, len(paths))
    if not syn.any():
        return _base(batch)
    if syn.all():
        return _keep_synthetic(batch, spec)
    # A block never spans files in practice; keep the rows' order if one ever does.
    keep = np.ones(len(paths), bool)
    keep[syn] = np.asarray(_keep_mask(batch.filter(pa.array(syn)), spec))
    return _base(batch.filter(pa.array(keep)))


def mixture_dataset(spec: Mixture | Any, **read_kwargs):
    """The mixture as a lazy Ray Dataset of the base columns (real rows, the kept synthetic rows, the extra rows).

    Every part's shards are read as one file list, so a file shuffle (``read_kwargs``, e.g.
    ``shuffle=FileShuffleConfig(seed)``, passed to ``read_parquet``) interleaves the parts
    file by file: a reader never sees all real rows, then all synthetic ones. Parts on
    different filesystems are read one after the other (a union).
    """
    import ray.data

    from synthaug import storage
    from synthaug.artifacts import read_ray, shard_paths

    todo = parts(spec)
    files = {part: shard_paths(loc) for part, loc in todo}
    kinds = {type(storage.resolve(loc)[0]) for _, loc in todo}  # one filesystem object reads them all
    every = [p for ps in files.values() for p in ps]
    if len(kinds) == 1 and every:
        fs, _ = storage.resolve(todo[0][1])
        ds = ray.data.read_parquet(every, filesystem=fs, columns=list(BASE_COLUMNS), include_paths=True, **read_kwargs)
        return ds.map_batches(_select, fn_kwargs={"spec": spec, "synthetic_paths": frozenset(files.get("synthetic", []))},
                              batch_format="pyarrow", batch_size=None)
    out = []
    for part, loc in todo:
        ds = read_ray(loc, columns=list(BASE_COLUMNS), **read_kwargs)
        if part == "synthetic":
            out.append(ds.map_batches(_keep_synthetic, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None))
        else:
            out.append(ds.map_batches(_base, batch_format="pyarrow", batch_size=None))
    return out[0] if len(out) == 1 else out[0].union(*out[1:])


def real_only(loc: str) -> Mixture:
    """A contract dataset used as is (every row; ``source`` says real or synthetic per row)."""
    m = read_manifest(loc)
    return Mixture(real=str(loc), synthetic=None, thresholds={}, counts={}, seed=0, ratio=0.0, synthetic_only=False,
                   n_real=int(m["num_rows"]), class_names=tuple(m["class_names"]),
                   image_size=tuple(int(v) for v in m["image_size"]), channels=int(m["channels"]))


def streams(spec: Mixture) -> tuple[Mixture, Mixture]:
    """A mixture as two streams (two-stream batches): its real rows, and its added rows (the kept
    synthetic rows and the extra set). A mixture without both raises (one stream is all it has)."""
    if spec.real is None or not (spec.n_synthetic or spec.n_extra):
        raise InputValueError("classify.added_batch: two-stream batches need real rows and added ones "
                              "(a synthetic ratio > 0 or pseudo-labelled rows)")
    real = dataclasses.replace(spec, synthetic=None, thresholds={}, counts={}, extra=None, n_extra=0)
    added = dataclasses.replace(spec, real=None, n_real=0)
    return real, added
