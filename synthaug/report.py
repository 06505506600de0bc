"""The end-to-end run's report: ``metrics.json``, ``summary.md``, plots and sample grids.

Everything here is computed from what the stages measured; nothing is typed in. The
headline comparison (real-only vs real + synthetic) comes from the sweep's trials,
paired by seed, so a gain within the seed spread is reported as such.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np

from synthaug import storage
from synthaug.artifacts import atomic_write_text, iter_batches, read_manifest
from synthaug.stats import excludes_zero, mean_std, paired, report_split, verdict
from synthaug.config import Config
from synthaug.data.images import decode_batch
from synthaug.evaluate.report import per_class_markdown, plot_vs_guidance, write_metrics


def first_per_class(loc, per_class: int, batch_size: int = 1024) -> dict[int, np.ndarray]:
    """Up to ``per_class`` uint8 ``(k, 3, H, W)`` images of each class, in manifest shard order.

    Streams the dataset and stops once every class is full, so at most ``classes x
    per_class`` images are held (a bounded read, whatever the dataset's size).
    """
    m = read_manifest(loc)
    want = {k: min(per_class, int(m["counts"].get(n, 0))) for k, n in enumerate(m["class_names"])}
    got: dict[int, list] = {k: [] for k in want}
    for b in iter_batches(loc, columns=["label", "image"], batch_size=batch_size):
        labels = b.column("label").to_pylist()
        images = b.column("image")
        for i, y in enumerate(labels):
            if y in got and len(got[y]) < want[y]:
                got[y].append(images[i].as_py())
        if all(len(got[k]) >= want[k] for k in want):
            break
    out = {}
    for k, pngs in got.items():
        x = decode_batch(pngs) if pngs else np.zeros((0, m["channels"], *m["image_size"]), np.uint8)
        out[k] = np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x[:, :3]  # (k, 3, H, W)
    return out


def sample_grid(real_dir, synthetic: dict, path, per_class: int = 8, scale: int = 4) -> str:
    """Per class (rows): ``per_class`` real train images, then ``per_class`` synthetic per guidance.

    Each set's block is a ``torchvision.utils.make_grid``; blocks are placed side by side,
    scaled by an integer ``scale`` (nearest neighbour, so pixels stay square) and labelled.
    Reads only the images drawn (:func:`first_per_class`); writes through the storage layer.
    """
    import torch
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    names = list(read_manifest(real_dir)["class_names"])
    sets = [("real", real_dir)] + [(f"w={w:g}", d) for w, d in synthetic.items()]
    blocks = []
    for _, loc in sets:
        imgs = first_per_class(loc, per_class)
        h, w = next(x.shape[2:] for x in imgs.values())
        tiles = []
        for k in range(len(names)):
            x = imgs.get(k, np.zeros((0, 3, h, w), np.uint8))
            pad = np.full((per_class - len(x), 3, h, w), 255, np.uint8)  # a short class: white tiles
            tiles.append(np.concatenate([x, pad]))
        t = torch.from_numpy(np.concatenate(tiles))  # (K * per_class, 3, H, W)
        blocks.append(make_grid(t, nrow=per_class, padding=1, pad_value=255).numpy())  # (3, Hg, Wg)
    gap = np.full((3, blocks[0].shape[1], 4), 128, np.uint8)
    grid = np.concatenate([x for b in blocks for x in (b, gap)][:-1], axis=2).transpose(1, 2, 0)  # (Hg, Wg, 3)
    hh, ww = grid.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(grid)).resize((ww * scale, hh * scale), Image.Resampling.NEAREST)
    left, top = 24, 16
    canvas = Image.new("RGB", (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    block_w = (blocks[0].shape[2] + gap.shape[2]) * scale
    for j, (label, _) in enumerate(sets):
        draw.text((left + j * block_w + 2, 2), label, fill="black")
    row_h = hh * scale // len(names)
    for i, name in enumerate(names):
        draw.text((2, top + i * row_h + row_h // 3), name[:3], fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return storage.write_bytes(path, buf.getvalue())


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def headline_ratio(ratios) -> float:
    """The headline's synthetic:real ratio: 1 when the grid has it, else its smallest positive ratio."""
    rs = {float(r) for r in ratios}
    return 1.0 if 1.0 in rs else float(sorted(rs - {0.0})[0]) if rs - {0.0} else 0.0


def _paired_row(real, runs: list[dict], column: str = "top1") -> dict:
    """Mean/std of ``runs``' ``column`` and their paired difference (by seed) against ``real`` (a seed -> top-1 Series)."""
    import pandas as pd

    top1 = pd.Series({int(r["seed"]): np.nan if r.get(column) is None else float(r[column]) for r in runs})
    g = paired((top1 - real.reindex(top1.index)).dropna())
    m, sd = mean_std(top1)
    return {"mean": m, "std": sd, "gain_mean": g["mean"], "gain_std": g["std"], "n_paired": g["n"],
            "gain_ci95_low": g["ci95"][0], "gain_ci95_high": g["ci95"][1], "within": not excludes_zero(g),
            "verdict": verdict(g)}


def _kept_markdown(kept: dict) -> list[str]:
    """The share of each class's synthetic images that confidence filtering kept, per filtered set."""
    from synthaug.sweep import setting_label

    names = list(next(iter(kept.values())))
    lines = ["## Confidence filtering", "",
             "Share of each class's synthetic images kept (teacher probability of the intended class >= tau), "
             "per filtered set (guidance w, image-to-image strength s, threshold tau); the sweep and the mixtures "
             "used the filtered sets.", "",
             "| set | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key, shares in kept.items():
        lines.append(f"| {setting_label(*key)} | " + " | ".join(_fmt(shares[n], 2) for n in names) + " |")
    return lines + [""]


def _tag(key: tuple) -> str:
    """A filtered set's metric-key tag: ``w2`` (the config's recipe), ``w2_s0.3_tau0.8`` otherwise."""
    g, st, t = key
    return f"w{g:g}" + (f"_s{st:g}" if st is not None else "") + f"_tau{t:g}"


@dataclasses.dataclass
class _Headline:
    """The headline comparison: real only vs real + synthetic at the config's recipe, paired by seed."""

    w0: float
    s0: float | None
    t0: float
    recipe: str
    head: dict  # the fidelity row at the config's guidance
    split: str  # the split figures are reported on
    column: str
    ratio: float
    real: Any  # seed -> top-1 of real only (a pandas Series)
    mixed: Any  # seed -> top-1 of real + synthetic
    gain: dict  # stats.paired of the difference


def _headline(cfg: Config, sweep, fidelity_rows: list[dict]) -> _Headline:
    """Real only vs real + synthetic (the headline ratio, the config's recipe), paired by seed.

    Reported on test when the run has a test split (nothing is chosen on it), else on val.
    """
    from synthaug.sweep import primary_strength, setting_label

    w0, s0, t0 = float(cfg.sample.guidance_scale), primary_strength(cfg), float(cfg.filter.tau)
    recipe = ", ".join([f"w={w0:g}", *([f"image-to-image s={s0:g}"] if s0 is not None else []),
                        *([f"filtered at tau={t0:g}"] if t0 else [])])
    split, column = report_split(sweep)
    real = sweep[sweep.ratio == 0].drop_duplicates("seed").set_index("seed")[column]
    ratio = headline_ratio(sweep.ratio)
    setting = sweep.setting if "setting" in sweep else sweep.guidance.map(lambda g: setting_label(g))
    mixed = sweep[(setting == setting_label(w0, s0, t0)) & (sweep.ratio == ratio)].set_index("seed")[column]
    return _Headline(w0, s0, t0, recipe, next(r for r in fidelity_rows if r["guidance_scale"] == w0), split, column,
                     ratio, real, mixed, paired((mixed - real.reindex(mixed.index)).dropna()))


def _headline_metrics(cfg: Config, h: _Headline, summary: dict, fidelity_rows: list[dict]) -> dict:
    """The flat metrics of the headline, the sweep's best cell and each guidance's fidelity row."""
    real_m, real_s = mean_std(h.real)
    mix_m, mix_s = mean_std(h.mixed)
    metrics = {
        "run": cfg.name, "seeds": len(h.real), "headline_guidance": h.w0, "headline_ratio": h.ratio,
        "report_split": h.split, "paired_gain_ci95_low": h.gain["ci95"][0], "paired_gain_ci95_high": h.gain["ci95"][1],
        "real_only_top1_mean": real_m, "real_only_top1_std": real_s,
        "real_plus_synthetic_top1_mean": mix_m, "real_plus_synthetic_top1_std": mix_s,
        "paired_gain_mean": h.gain["mean"], "paired_gain_std": h.gain["std"], "gain_within_noise": not excludes_zero(h.gain),
        "best_guidance": summary.get("best_guidance"), "best_strength": summary.get("best_strength"),
        "best_tau": summary.get("best_tau"), "best_setting": summary.get("best_setting"), "best_ratio": summary.get("best_ratio"),
        "best_top1_mean": summary.get("best_top1_mean"), "best_top1_std": summary.get("best_top1_std"),
        "best_gain_mean": summary.get("gain_mean"), "best_gain_std": summary.get("gain_std"),
        "sweep_verdict": summary.get("verdict"),
        "sweep_cells_left_out": "; ".join(f"{c['setting']} ratio {c['ratio']:g}" for c in summary.get("skipped", [])),
    }
    for r in sorted(fidelity_rows, key=lambda r: r["guidance_scale"]):
        tag = f"w{r['guidance_scale']:g}"
        for k in ("fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "f_score",
                  "near_copy_share", "pixel_near_copy_share", "cas_top1_mean", "cas_top1_std", "cas_top5_mean"):
            metrics[f"{k}_{tag}"] = r.get(k)
    metrics.update({k: h.head.get(k) for k in ("n_real", "n_synthetic", "extractor", "extractor_hash",
                                               "kid_subset_size", "fid_small_sample_warning", "near_copy_threshold")})
    return metrics


def _pseudo_rows(h: _Headline, pseudo: dict | None, metrics: dict) -> list[tuple[str, dict]]:
    """The pseudo-label baseline (and its combination with synthetic images), paired with real only by
    seed, as ``(label, row)``; their figures go into ``metrics``."""
    if pseudo is None:
        return []
    rows = [(f"pseudo-label ({pseudo['n_pseudo']} of {pseudo['pool_rows']} pool images)",
             _paired_row(h.real, pseudo["students"], h.column))]
    metrics.update({"pseudo_label_n": pseudo["n_pseudo"], "pseudo_label_pool_rows": pseudo["pool_rows"],
                    "pseudo_label_kept_share": pseudo["kept_share"], "pseudo_label_teacher_top1": pseudo["teacher_top1"],
                    "pseudo_label_selection": " ".join(f"{k}={v}" for k, v in pseudo["selection"].items())})
    for k, v in rows[0][1].items():
        metrics[f"pseudo_label_top1_{k}" if k in ("mean", "std") else f"pseudo_label_{k}"] = v
    if "combined" in pseudo:
        row = _paired_row(h.real, pseudo["combined"], h.column)
        rows.append((f"pseudo-label + synthetic (1:{pseudo['combined_ratio']:g}, {h.recipe})", row))
        for k, v in row.items():
            metrics[f"pseudo_plus_synthetic_top1_{k}" if k in ("mean", "std") else f"pseudo_plus_synthetic_{k}"] = v
    return rows


def _filter_kept(cfg: Config, h: _Headline, filtered: dict | None, metrics: dict) -> dict:
    """``(guidance, strength, tau)`` -> class -> the share of a filtered set's images kept; into ``metrics`` too."""
    from synthaug.classify.pseudolabel import kept_per_class

    kept = {}
    if filtered:
        metrics["filter_tau"] = float(cfg.filter.tau)
        for key, m in filtered.items():
            kept[key] = kept_per_class(m)
            tag = f"w{key[0]:g}" if key[1:] == (h.s0, h.t0) else _tag(key)
            metrics[f"filter_kept_share_{tag}"] = m["num_rows"] / max(1, sum(m["counts_before"].values()))
            for c, v in kept[key].items():
                metrics[f"filter_kept_share_{tag}_{c}"] = v
    return kept


def _seconds_metrics(seconds: dict) -> dict:
    out = {f"seconds_{k.split()[0]}_{k.split('=')[-1]}" if "=" in k else f"seconds_{k}": v for k, v in seconds.items()}
    return {**out, "seconds_total": round(sum(seconds.values()), 1)}


def _write_figures(out: str, paths, fidelity_rows: list[dict], sets: dict, head: dict) -> None:
    """Fidelity vs guidance, the sample grid and (when audited) the closest synthetic/train pairs."""
    from synthaug.evaluate.memorization import save_pairs_grid

    plot_vs_guidance([{"guidance_scale": r["guidance_scale"], "fid": r.get("fid"), "isc_mean": r.get("isc_mean"),
                       "isc_std": r.get("isc_std"), "cas": r.get("cas_top1_mean"), "cas_std": r.get("cas_top1_std")}
                      for r in fidelity_rows], storage.join(out, "fidelity_vs_guidance.png"))
    sample_grid(paths.data("train"), dict(sorted(sets.items())), storage.join(out, "samples_per_class.png"))
    if head.get("_audit", {}).get("pairs"):
        save_pairs_grid(head["_audit"]["pairs"], storage.join(out, "closest_pairs.png"))


def _per_class(head: dict) -> dict:
    """Per class at the headline guidance: FID, CAS top-1 and near-copy share."""
    audit_pc = head.get("_audit", {}).get("per_class", {})
    return {c: {"fid": head.get("per_class_fid", {}).get(c, {}).get("fid"), "cas_top1": cas_top1,
                "near_copy_share": audit_pc.get(c, {}).get("near_copy_share")}
            for c, cas_top1 in head.get("cas_per_class_top1", {}).items()}


def _headline_markdown(cfg: Config, h: _Headline, summary: dict, pl_rows: list, pseudo: dict | None) -> list[str]:
    """summary.md's title, headline table, verdicts and sweep lines."""
    from synthaug.classify.pseudolabel import describe_selection
    from synthaug.sweep import setting_label

    real_m, real_s = mean_std(h.real)
    mix_m, mix_s = mean_std(h.mixed)
    return [
        f"# synthaug run `{cfg.name}`", "",
        f"Data: `{cfg.ingest.source}`, {cfg.ingest.k_per_class or 'all'} labelled images per class"
        + (" + unlabelled pool for generator pretraining" if cfg.ingest.k_per_class and cfg.ingest.unlabelled_pool else "")
        + f". Classifier `{cfg.classify.model}`, {cfg.classify.epochs} epochs of |real| images each, seeds {list(cfg.classify.seeds)}.",
        "",
        "## Headline: does synthetic data help?", "",
        f"| training set | top-1 on real {h.split} (mean ± std over seeds) |", "| --- | --- |",
        f"| real only | {_fmt(real_m)} ± {_fmt(real_s)} |",
        f"| real + synthetic (1:{h.ratio:g}, {h.recipe}) | {_fmt(mix_m)} ± {_fmt(mix_s)} |",
        *([f"| real + synthetic, the sweep's best cell (1:{summary['best_ratio']:g}, {summary['best_setting']}) "
           f"| {_fmt(summary['best_top1_mean'])} ± {_fmt(summary.get('best_top1_std'))} |"]
          if summary.get("best_setting") and (summary["best_setting"] != setting_label(h.w0, h.s0, h.t0)
                                              or summary["best_ratio"] != h.ratio) else []),
        *[f"| {label} | {_fmt(r['mean'])} ± {_fmt(r['std'])} |" for label, r in pl_rows],
        f"| synthetic only (CAS on val, w={h.w0:g}) | {_fmt(h.head.get('cas_top1_mean'))} ± {_fmt(h.head.get('cas_top1_std'))} |",
        "",
        f"Recipes and the sweep's best cell are chosen on val; the figures above are on {h.split}"
        + (" (a split nothing was chosen on)." if h.split == "test" else " (the run has no test split: set ingest.test_fraction or ingest.test_path)."),
        "",
        "Paired gain of real + synthetic over real only: "
        + ("the sweep left this cell out (below)." if h.mixed.empty and summary.get("skipped") else f"**{verdict(h.gain)}**."),
        "",
        *[line for label, r in pl_rows for line in (f"Paired gain of {label} over real only: **{r['verdict']}**.", "")],
        *([f"Pseudo-labels: a teacher trained on the labelled set (real only, seed {cfg.pseudolabel.teacher_seed}, "
           f"top-1 {_fmt(pseudo['teacher_top1'])}) labelled the unlabelled pool; kept "
           + describe_selection(cfg) + f" ({_fmt(100 * pseudo['kept_share'], 1)}% of the pool). Students: the same recipe and optimiser steps as "
           "real only (an epoch is |labelled| images).", ""] if pseudo is not None else [""]),
        f"Sweep (synthetic-set setting x ratio, {len(h.real)} seeds): {summary.get('verdict')}", "",
        *(["Sweep cells left out (a filtered set kept too few images of a class): "
           + "; ".join(f"{c['setting']} at ratio {c['ratio']:g} ({c['why']})" for c in summary["skipped"]) + ".", ""]
          if summary.get("skipped") else []),
    ]


def _fidelity_markdown(cfg: Config, head: dict, fidelity_rows: list[dict]) -> list[str]:
    """summary.md's generator-quality table, one row per guidance scale, and the near-copy note."""
    lines = [
        "## Generator quality per guidance scale", "",
        f"Extractor: `{head.get('extractor')}` (a classifier trained on the real train split), reference set: real val "
        f"({head.get('n_real')} images), {head.get('n_synthetic')} synthetic images per guidance. "
        "FID/IS/KID from this extractor are comparable only with the same extractor, reference set and sample count.",
        "",
        "| w | FID | IS | KID (x1e3) | precision | recall | CAS top-1 | near-copy share (features) | near-copy share (pixels) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(fidelity_rows, key=lambda r: r["guidance_scale"]):
        lines.append(
            f"| {r['guidance_scale']:g} | {_fmt(r.get('fid'))} | {_fmt(r.get('isc_mean'))} ± {_fmt(r.get('isc_std'))} "
            f"| {_fmt(1e3 * r['kid_mean'] if r.get('kid_mean') is not None else None)} | {_fmt(r.get('precision'), 3)} "
            f"| {_fmt(r.get('recall'), 3)} | {_fmt(r.get('cas_top1_mean'))} ± {_fmt(r.get('cas_top1_std'))} "
            f"| {_fmt(r.get('near_copy_share'), 3)} | {_fmt(r.get('pixel_near_copy_share'), 3)} |")
    return lines + [
        "", f"Near-copy: a synthetic image closer to its nearest real train image than the {cfg.evaluate.near_copy_percentile:g}th "
        "percentile of real-val-to-train distances. A set that copied its training data would score near 1; "
        f"real val itself scores {cfg.evaluate.near_copy_percentile / 100:.2f} by construction.", "",
    ]


def _files_and_times_markdown(seconds: dict, total: float) -> list[str]:
    return [
        "## Files", "",
        "- `metrics.json` / `metrics.md`: every number above, flat keys",
        "- `sweep/`: the Ray Tune table (`sweep.csv`, `sweep.parquet`), `heatmap.png`, `accuracy_vs_ratio.png`, `summary.md`",
        "- `fidelity_vs_guidance.png`: FID, IS and CAS vs guidance (paper Fig. 3 style)",
        "- `samples_per_class.png`: real train images next to synthetic ones, per class; `closest_pairs.png`: the closest synthetic/train pairs",
        "- `config.yaml`: the resolved config", "",
        "## Stage times (s)", "", "| stage | seconds |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in seconds.items()],
        f"| **total** | {total} |", "",
    ]


def write_run_report(cfg: Config, paths, fidelity_rows: list[dict], sweep, sets: dict, seconds: dict,
                     pseudo: dict | None = None, filtered: dict | None = None) -> dict:
    """Write ``<results>/<name>/{metrics.json, summary.md, *.png}``; returns the flat metrics.

    ``pseudo``: what ``pipeline.stage_pseudolabel`` returned (the pseudo-label row, paired
    by seed with the sweep's real-only runs); ``filtered``: ``(guidance, strength, tau)`` ->
    the filtered set's manifest (the share kept per class).
    """
    out = str(paths.results)
    summary = sweep.attrs["summary"]
    h = _headline(cfg, sweep, fidelity_rows)

    # Metrics: the headline, fidelity, the pseudo-label rows, filtering, stage times.
    metrics = _headline_metrics(cfg, h, summary, fidelity_rows)
    pl_rows = _pseudo_rows(h, pseudo, metrics)
    kept = _filter_kept(cfg, h, filtered, metrics)
    metrics.update(_seconds_metrics(seconds))
    write_metrics(out, metrics)

    _write_figures(out, paths, fidelity_rows, sets, h.head)

    # summary.md
    per_class = _per_class(h.head)
    lines = [
        *_headline_markdown(cfg, h, summary, pl_rows, pseudo),
        *_fidelity_markdown(cfg, h.head, fidelity_rows),
        f"## Per class (w={h.w0:g})", "", per_class_markdown(per_class) if per_class else "(no per-class data)", "",
        *(_kept_markdown(kept) if kept else []),
        *_files_and_times_markdown(seconds, metrics["seconds_total"]),
    ]
    atomic_write_text(storage.join(out, "summary.md"), "\n".join(lines))
    return metrics
