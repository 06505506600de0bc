"""Real + synthetic training mixtures, as a pure function of (real, synthetic, ratio, seed).

The mixing model (Azizi et al. 2023 train on real plus a multiple of it in synthetic):

* ``ratio`` r >= 0 adds ``round(r * |real|)`` synthetic images to all the real ones.
* The synthetic part is class-balanced like the real part: class c gets r x (its real
  count). Per-class shares are rounded by largest remainder so that they add up to
  exactly ``round(r * |real|)`` (ties go to the lower label).
* Class c's synthetic rows are a seeded permutation of that class's synthetic rows, cut
  to length, so they are drawn without replacement and the rows for a smaller r are a
  prefix of those for a larger r with the same seed (nested mixtures: a ratio sweep
  changes only how much synthetic data there is, not which).
* r = 0 is the real set alone; ``synthetic_only`` keeps only the synthetic part, sized as
  for r (or every synthetic row when r = 0).

The output keeps the contract's base columns only (``id, image, label, class_name,
source``); provenance columns of the synthetic set stay in its own dataset.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from synthaug.artifacts import BASE_COLUMNS

BASE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("label", pa.int64()),
    ("class_name", pa.string()),
    ("source", pa.string()),
])


def class_map(table: pa.Table, where: str) -> dict[str, int]:
    """class_name -> label of a labelled table; raises if one name has two labels."""
    names = table.column("class_name").to_pylist()
    labels = table.column("label").to_pylist()
    out: dict[str, int] = {}
    for name, label in zip(names, labels):
        if out.setdefault(name, int(label)) != int(label):
            raise ValueError(f"{where}: class {name!r} has labels {out[name]} and {label}")
    return out


def check_same_classes(real: pa.Table, synthetic: pa.Table, where: str = "synthetic set") -> None:
    """Raise naming both lists when the synthetic classes (or their labels) differ from the real ones."""
    r, s = class_map(real, "real set"), class_map(synthetic, where)
    if sorted(r) != sorted(s):
        raise ValueError(
            f"{where}: synthetic class names {sorted(s)} do not match the real class names {sorted(r)}"
        )
    bad = [n for n in r if r[n] != s[n]]
    if bad:
        pairs = ", ".join(f"{n!r}: real {r[n]} vs synthetic {s[n]}" for n in bad)
        raise ValueError(f"{where}: synthetic labels differ from the real ones for class {pairs}")


def per_class_counts(real_labels: np.ndarray, ratio: float) -> dict[int, int]:
    """Synthetic rows per label: r x real count, largest-remainder rounded to round(r |real|)."""
    labels, counts = np.unique(real_labels, return_counts=True)
    exact = ratio * counts.astype(np.float64)
    base = np.floor(exact).astype(np.int64)
    missing = int(round(ratio * len(real_labels))) - int(base.sum())
    # Largest fractional part first; a stable sort gives ties to the lower label.
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:max(missing, 0)]] += 1
    return {int(k): int(n) for k, n in zip(labels, base)}


def _base(table: pa.Table) -> pa.Table:
    return table.select(list(BASE_COLUMNS)).cast(BASE_SCHEMA)


def mix(
    real: pa.Table,
    synthetic: pa.Table | None,
    ratio: float,
    seed: int,
    synthetic_only: bool = False,
) -> pa.Table:
    """The training table for mixing ratio ``ratio`` (see the module docstring for the model)."""
    ratio = float(ratio)
    if not np.isfinite(ratio) or ratio < 0:
        raise ValueError(f"mixing ratio must be >= 0, got {ratio}")
    if real.num_rows == 0:
        raise ValueError("real set is empty; a mixture needs real images to size the synthetic part")
    if synthetic is not None:
        check_same_classes(real, synthetic)
    uses_synthetic = ratio > 0 or synthetic_only
    if uses_synthetic and synthetic is None:
        raise ValueError(f"ratio {ratio} (synthetic_only={synthetic_only}) needs a synthetic set, got None")
    if not uses_synthetic:
        return _base(real)
    syn = _base(synthetic)
    if synthetic_only and ratio == 0:
        return syn

    # Draw each class's share from that class's synthetic rows.
    real_labels = np.asarray(real.column("label").to_pylist(), dtype=np.int64)
    syn_labels = np.asarray(syn.column("label").to_pylist(), dtype=np.int64)
    names = dict(zip(real_labels.tolist(), real.column("class_name").to_pylist()))
    picked = []
    for label, n in per_class_counts(real_labels, ratio).items():
        rows = np.flatnonzero(syn_labels == label)
        if n > rows.size:
            raise ValueError(
                f"class {names[label]!r} (label {label}): ratio {ratio} needs {n} synthetic images, "
                f"the synthetic set has {rows.size}"
            )
        rng = np.random.default_rng([int(seed), label])  # per class: independent of other classes
        picked.append(rows[rng.permutation(rows.size)[:n]])
    idx = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    chosen = syn.take(pa.array(idx, pa.int64()))
    if synthetic_only:
        return chosen

    mixed = pa.concat_tables([_base(real), chosen])
    ids = mixed.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = sorted(set(real.column("id").to_pylist()) & set(chosen.column("id").to_pylist()))
        raise ValueError(f"real and synthetic sets share id(s) {dup[:5]}; ids must be unique in a mixture")
    return mixed
