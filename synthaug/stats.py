"""Seed statistics, one helper for every report: mean and spread over seeds, and paired differences.

A gain counts only when the 95 % t interval of the paired differences excludes zero
(:func:`verdict`); with fewer than two pairs the noise cannot be judged.
"""

from __future__ import annotations

import math

import numpy as np


def _finite(values) -> np.ndarray:
    """The values that were measured (None and NaN dropped), as floats."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return v[~np.isnan(v)]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (NaN for fewer than two values; NaN mean for none)."""
    v = _finite(values)
    mean = float(v.mean()) if len(v) else float("nan")
    return mean, float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def paired(diffs) -> dict:
    """Mean, sample std, n and the 95 % t interval of paired differences."""
    from scipy import stats

    d = _finite(diffs)
    n = len(d)
    mean, sd = mean_std(d)
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "std": sd, "n": n, "ci95": [mean - half, mean + half]}


def report_split(table) -> tuple[str, str]:
    """("test", "test_top1") when a table of runs (a DataFrame) evaluated a test split, else ("val", "top1").

    Recipes are chosen on val; figures are reported on the split this names."""
    if "test_top1" in table and table["test_top1"].notna().any():
        return "test", "test_top1"
    return "val", "top1"


def excludes_zero(g: dict) -> bool:
    lo, hi = g["ci95"]
    return g["n"] > 1 and (lo > 0 or hi < 0)


def verdict(g: dict, what: str = "real only") -> str:
    """'<gain> ..., better/worse than <what> (95 % interval excludes 0)' or 'within noise'."""
    if g["n"] == 0:
        return "no paired runs: nothing to compare"
    if g["n"] < 2:
        return f"{g['mean']:+.2f} points, one seed: noise cannot be judged"
    lo, hi = g["ci95"]
    text = f"{g['mean']:+.2f} ± {g['std']:.2f} points over {g['n']} pairs, 95 % interval [{lo:+.2f}, {hi:+.2f}]"
    if not excludes_zero(g):
        return f"{text}: within noise (the interval holds 0)"
    return f"{text}: {'better' if g['mean'] > 0 else 'worse'} than {what} (the interval excludes 0)"
