"""Training order: shards that mix classes, a read-side buffer sized from the data, and a check of both.

Writers lay out shards that each mix classes (a seeded order of the rows before they are
cut into shards: :func:`layout_order`). Readers do not trust that: a trainer reads the
files in a seeded order and draws its batches from a local shuffle buffer that holds at
least :data:`SHARDS` shards' rows (:func:`buffer_rows`), within a memory cap, so a
dataset written class by class by something else (a user's Parquet, an older set) still
gives class-mixed batches. What a trainer actually saw is measured (:class:`BatchMix`) and
goes into its metrics; a blocked stream is named in one warning line.

A batch (or shard) is *blocked* when its most frequent class holds more rows than
``max(2 B p, B p + 4 sqrt(B p (1 - p)))``, with ``B`` its rows and ``p`` that class's share
of the dataset: more than twice its share, and beyond what an i.i.d. draw of ``B`` rows
gives (so small batches are not flagged by chance).
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np

from synthaug.keys import row_keys

SHARDS = 16  # shards' rows a reader's shuffle buffer holds at least (within its memory cap)
BLOCKED_WARN = 0.25  # share of blocked batches above which a run warns


def layout_order(ids, seed: int) -> np.ndarray:
    """The order in which a writer lays out rows: by a seeded hash of the id (a permutation of ``range(len(ids))``).

    A function of (seed, id) only, so the layout, and each row, do not depend on the listing order.
    """
    return np.argsort(row_keys(ids, seed, "layout"), kind="stable")


def buffer_rows(shard_rows: Iterable[int], row_bytes: int, *, minimum: int, cap_mb: float, shards: int = SHARDS) -> int:
    """Rows of a reader's local shuffle buffer: ``shards`` of the largest shards, at least ``minimum``, at most ``cap_mb``.

    ``row_bytes`` is a decoded row's size in the buffer. The cap wins over both.
    """
    rows = [int(r) for r in shard_rows]
    want = max(int(minimum), shards * (max(rows) if rows else 0))
    cap = max(1, int(cap_mb * 2**20 // max(1, int(row_bytes))))
    return max(1, min(want, cap))


def over(count: float, rows: float, share: float) -> bool:
    """Whether ``count`` of ``rows`` rows of one class is more than a batch of that size would hold (module docstring)."""
    mean = rows * share
    return bool(count > max(2 * mean, mean + 4 * math.sqrt(mean * (1 - share))))


def blocked(counts: np.ndarray, shares: np.ndarray) -> bool:
    """Whether one batch's (or shard's) per-class ``counts`` are dominated by one class."""
    counts = np.asarray(counts, np.float64)
    if counts.sum() == 0:
        return False
    c = int(np.argmax(counts))
    return over(counts[c], counts.sum(), float(shares[c]) if c < len(shares) else 0.0)


def blocked_shards(manifest: dict) -> list[str]:
    """The shards of a dataset manifest that one class dominates (from each shard's ``majority`` entry)."""
    counts = manifest.get("counts") or {}
    total = np.asarray([counts.get(n, 0) for n in manifest.get("class_names", [])], np.float64)
    if not total.sum():
        return []
    shares = total / total.sum()
    return [s["path"] for s in manifest.get("shards", [])
            if "majority" in s and s.get("rows") and over(s["majority"][1], s["rows"], shares[int(s["majority"][0])])]


class BatchMix:
    """The class mix of the batches a trainer consumed: wrap the batch stream with :meth:`watch`.

    ``summary()`` gives ``batch_blocked_share`` (blocked batches / batches, against the
    classes' shares over everything seen) and ``batch_label_entropy`` (the mean batch label
    entropy over the entropy of everything seen: about 1 for i.i.d. batches of a few dozen
    rows, 0 when every batch is one class). It keeps three numbers per batch and the class
    totals, whatever the number of classes.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.total = np.zeros(self.num_classes, np.int64)
        self.top: list[tuple[int, int, int, float]] = []  # (rows, most frequent class, its rows, label entropy)

    def add(self, labels) -> None:
        y = np.asarray(labels).astype(np.int64).ravel()
        y = y[(y >= 0) & (y < self.num_classes)]
        if not len(y):
            return
        counts = np.bincount(y, minlength=self.num_classes)
        self.total += counts
        c = int(np.argmax(counts))
        self.top.append((len(y), c, int(counts[c]), _entropy(counts / len(y))))

    def watch(self, batches: Iterable, label=lambda b: b["label"]) -> Iterator:
        for b in batches:
            lab = label(b)
            self.add(lab.numpy() if hasattr(lab, "numpy") else lab)
            yield b

    def summary(self) -> dict:
        if not self.top:
            return {"batch_blocked_share": float("nan"), "batch_label_entropy": float("nan")}
        shares = self.total / self.total.sum()
        blocked_share = float(np.mean([over(n, rows, shares[c]) for rows, c, n, _ in self.top]))
        full = _entropy(shares)
        ratio = float(np.mean([e for *_, e in self.top]) / full) if full > 0 else 1.0
        return {"batch_blocked_share": round(blocked_share, 4), "batch_label_entropy": round(ratio, 4)}


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def warn_if_blocked(stage: str, dataset: str, summary: dict) -> str | None:
    """One warning line (printed and returned) when a run's batches were blocked by class; else None."""
    share = summary.get("batch_blocked_share", float("nan"))
    if not share > BLOCKED_WARN:
        return None
    line = (f"[{stage}] warning: {share:.0%} of the training batches from {dataset} were dominated by one class "
            f"(label entropy {summary.get('batch_label_entropy', float('nan')):.2f} of the data's); its shards are "
            f"class-sorted beyond the shuffle buffer: raise shuffle_buffer_mb or re-write the set with synthaug")
    print(line, flush=True)
    return line
