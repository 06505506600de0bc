"""Reports of the evaluate stage: metrics.json + markdown tables, and Fig. 3-style plots.

JSON has no NaN, so a NaN metric (e.g. a per-class FID below the minimum count) is
written as ``null``, meaning "not available"; the markdown shows ``n/a``.
"""

from __future__ import annotations

import io
import math

from synthaug import storage
from synthaug.artifacts import atomic_write_json, atomic_write_text

_SCALARS = (bool, int, float, str, type(None))


def _clean(value):
    """A JSON-safe scalar: NaN/inf -> None, numpy scalars -> Python."""
    if hasattr(value, "item") and not isinstance(value, _SCALARS):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value) -> str:
    value = _clean(value)
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _check_flat(metrics: dict) -> None:
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise ValueError(f"metric key {k!r} is not a string")
        if not (isinstance(v, _SCALARS) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0)):
            raise ValueError(f"metric {k!r} is a {type(v).__name__}, not a scalar; metrics.json is flat")


def metrics_markdown(metrics: dict) -> str:
    """A two-column markdown table (metric, value) in the dict's order."""
    rows = [f"| `{k}` | {_fmt(v)} |" for k, v in metrics.items()]
    return "| metric | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def write_metrics(out_dir, metrics: dict, name: str = "metrics") -> tuple[str, str]:
    """Write ``<name>.json`` (flat scalars, NaN as null) and ``<name>.md`` at any location; return both."""
    _check_flat(metrics)
    clean = {k: _clean(v) for k, v in metrics.items()}
    js = atomic_write_json(storage.join(out_dir, f"{name}.json"), clean)
    md = atomic_write_text(storage.join(out_dir, f"{name}.md"), metrics_markdown(metrics))
    return js, md


def per_class_markdown(per_class: dict[str, dict], columns: list[str] | None = None) -> str:
    """class -> {column: value} as a markdown table; columns default to the first row's keys."""
    if not per_class:
        return "| class |\n| --- |\n"
    columns = columns or list(next(iter(per_class.values())).keys())
    head = "| class | " + " | ".join(columns) + " |\n| --- |" + " --- |" * len(columns) + "\n"
    rows = [f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for name, row in per_class.items()]
    return head + "\n".join(rows) + "\n"


def write_per_class(out_dir, per_class: dict[str, dict], name: str = "per_class") -> tuple[str, str]:
    """Write ``<name>.json`` and ``<name>.md`` of a per-class breakdown (any location)."""
    clean = {c: {k: _clean(v) for k, v in row.items()} for c, row in per_class.items()}
    js = atomic_write_json(storage.join(out_dir, f"{name}.json"), clean)
    md = atomic_write_text(storage.join(out_dir, f"{name}.md"), per_class_markdown(per_class))
    return js, md


def save_figure(fig, path, dpi: int = 120) -> str:
    """A matplotlib figure as PNG at any location."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return storage.write_bytes(path, buf.getvalue())


def plot_vs_guidance(rows: list[dict], path) -> str:
    """FID, IS and CAS against the guidance scale (Azizi et al. 2023, Fig. 3), one PNG.

    Each row: ``guidance_scale``, and any of ``fid``, ``isc_mean`` (+ ``isc_std``),
    ``cas`` (+ ``cas_std``) from the caller; an optional ``series`` label draws one line
    per series (e.g. per generator). Missing or NaN values are skipped.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if not rows:
        raise ValueError("plot_vs_guidance: no rows")
    for i, r in enumerate(rows):
        if "guidance_scale" not in r:
            raise ValueError(f"plot_vs_guidance: row {i} has no 'guidance_scale'")
    panels = (("fid", None, "FID (lower is better)"), ("isc_mean", "isc_std", "IS (same extractor as FID)"), ("cas", "cas_std", "CAS (top-1 acc.)"))
    series = sorted({str(r.get("series", "")) for r in rows})
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (key, err, title) in zip(axes, panels):
        drawn = False
        for s in series:
            pts = sorted(
                (float(r["guidance_scale"]), _clean(r.get(key)), _clean(r.get(err)) if err else None)
                for r in rows if str(r.get("series", "")) == s
            )
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            yerr = [p[2] or 0.0 for p in pts] if err and any(p[2] for p in pts) else None
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=s or None)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("guidance scale w")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if drawn and len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
