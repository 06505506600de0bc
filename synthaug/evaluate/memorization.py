"""Near-copy audit: does the generator reproduce its training images?

For each synthetic image, the nearest real *train* image (L2, over all classes) in
feature space and, optionally, in pixel space. A synthetic image counts as a near copy
when that distance is at most the ``percentile``-th percentile of the distances from
real *val* images to their nearest train image: real held-out images are the yardstick
of "as close as two different real images of this domain get". With the default 5th
percentile, a generator that never copies still flags about 5% of its samples if they
are as close to train as val is -- compare the share with ``percentile``, not with 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from synthaug.artifacts import DatasetError, read_manifest, read_table
from synthaug.data.images import decode_batch, to_float


@dataclass(frozen=True)
class Pair:
    """A synthetic image and its nearest real train image (images: uint8 ``(C, H, W)``)."""

    synthetic_id: str
    train_id: str
    synthetic_index: int
    train_index: int
    distance: float  # feature-space L2
    pixel_distance: float  # pixel-space L2 in [-1, 1] units to the same train image; NaN if not computed
    synthetic_label: int
    train_label: int
    synthetic_image: np.ndarray
    train_image: np.ndarray

    def as_row(self) -> dict:
        """The JSON-able part (no images)."""
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_image")}


def _load(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """ids, labels, uint8 (N, C, H, W) images and class names of a contract dataset."""
    manifest = read_manifest(path)
    table = read_table(path, columns=["id", "image", "label"])
    if table.num_rows == 0:
        raise DatasetError(f"{path}: empty dataset (0 rows); nothing to audit")
    try:
        images = decode_batch(table.column("image").to_pylist())  # (N, C, H, W)
    except ValueError as e:
        raise DatasetError(f"{path}: images of different sizes cannot be compared ({e})") from None
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    return table.column("id").to_pylist(), labels, images, list(manifest["class_names"])


def nearest(query: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``query`` (N, D), the L2 distance to and index of its nearest ``ref`` row."""
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    dists, idx = [], []
    for part in q.split(chunk):
        # Exact differences, not the matmul shortcut, so exact copies come out at 0.
        d = torch.cdist(part, r, compute_mode="donot_use_mm_for_euclid_dist")  # (n, M)
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists).numpy().astype(np.float64), torch.cat(idx).numpy()


def _features(feature_fn: Callable, images: np.ndarray, where) -> np.ndarray:
    f = np.asarray(feature_fn(images), dtype=np.float32)
    if f.ndim != 2 or len(f) != len(images):
        raise ValueError(f"feature_fn returned shape {f.shape} for {len(images)} images of {where}; expected (N, D)")
    return f


def near_copy_audit(
    train_dir: str | Path,
    val_dir: str | Path,
    synth_dir: str | Path,
    feature_fn: Callable[[np.ndarray], np.ndarray],
    percentile: float = 5.0,
    *,
    pixel: bool = True,
    top_k: int = 16,
) -> dict:
    """Share of synthetic images closer to a train image than real val images get.

    ``feature_fn`` maps uint8 ``(B, C, H, W)`` to ``(B, D)`` features (e.g.
    :func:`synthaug.evaluate.fidelity.make_feature_fn`). Returns scalar keys
    near_copy_share, near_copy_threshold, pixel_near_copy_share, pixel_threshold,
    percentile, n_train, n_val, n_synthetic, feature_dim; ``per_class`` (class name ->
    {n_synthetic, near_copy_share, pixel_near_copy_share}, by the synthetic label); and
    ``pairs``: the ``top_k`` closest synthetic/train :class:`Pair` s, closest first.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")

    # Load the three sets.
    tr_ids, tr_lab, tr_img, class_names = _load(train_dir)
    _, _, va_img, _ = _load(val_dir)
    sy_ids, sy_lab, sy_img, _ = _load(synth_dir)
    if pixel and not (tr_img.shape[1:] == va_img.shape[1:] == sy_img.shape[1:]):
        raise DatasetError(
            f"pixel-space audit needs one image shape: train {train_dir} {tr_img.shape[1:]}, "
            f"val {val_dir} {va_img.shape[1:]}, synthetic {synth_dir} {sy_img.shape[1:]}; pass pixel=False"
        )

    # Feature space: threshold from val -> train, then synthetic -> train.
    f_tr = _features(feature_fn, tr_img, train_dir)
    d_val, _ = nearest(_features(feature_fn, va_img, val_dir), f_tr)
    d_syn, nn = nearest(_features(feature_fn, sy_img, synth_dir), f_tr)
    threshold = float(np.percentile(d_val, percentile))
    copy = d_syn <= threshold

    # Pixel space, same recipe on flattened [-1, 1] pixels.
    p_syn = np.full(len(sy_img), np.nan)
    p_copy = np.zeros(len(sy_img), bool)
    p_threshold = float("nan")
    if pixel:
        flat = lambda x: to_float(x).reshape(len(x), -1)  # noqa: E731  (N, C*H*W)
        p_val, _ = nearest(flat(va_img), flat(tr_img))
        p_syn_nn, _ = nearest(flat(sy_img), flat(tr_img))
        p_threshold = float(np.percentile(p_val, percentile))
        p_copy = p_syn_nn <= p_threshold
        # Pixel distance to the feature-space neighbour, for the pairs shown.
        p_syn = np.linalg.norm(flat(sy_img) - flat(tr_img[nn]), axis=1)

    per_class = {}
    for k, name in enumerate(class_names):
        sel = sy_lab == k
        n = int(sel.sum())
        per_class[name] = {
            "n_synthetic": n,
            "near_copy_share": float(copy[sel].mean()) if n else float("nan"),
            "pixel_near_copy_share": float(p_copy[sel].mean()) if n and pixel else float("nan"),
        }

    pairs = [
        Pair(sy_ids[i], tr_ids[nn[i]], int(i), int(nn[i]), float(d_syn[i]), float(p_syn[i]),
             int(sy_lab[i]), int(tr_lab[nn[i]]), sy_img[i], tr_img[nn[i]])
        for i in np.argsort(d_syn, kind="stable")[:top_k]
    ]
    return {
        "near_copy_share": float(copy.mean()),
        "near_copy_threshold": threshold,
        "pixel_near_copy_share": float(p_copy.mean()) if pixel else float("nan"),
        "pixel_threshold": p_threshold,
        "percentile": float(percentile),
        "n_train": len(tr_img),
        "n_val": len(va_img),
        "n_synthetic": len(sy_img),
        "feature_dim": int(f_tr.shape[1]),
        "per_class": per_class,
        "pairs": pairs,
    }


def save_pairs_grid(pairs: list[Pair], path: str | Path, per_row: int = 8) -> Path:
    """A PNG of the closest pairs: synthetic on top, its nearest train image below, distance in the title."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if not pairs:
        raise ValueError("save_pairs_grid: no pairs to draw")
    cols = min(per_row, len(pairs))
    blocks = -(-len(pairs) // cols)
    fig = Figure(figsize=(1.4 * cols, 3.0 * blocks))
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, p in enumerate(pairs):
        r, c = 2 * (j // cols), j % cols
        for row, img, title in ((r, p.synthetic_image, f"syn d={p.distance:.2f}"), (r + 1, p.train_image, f"train {p.train_id}")):
            hwc = np.asarray(img).transpose(1, 2, 0)  # (H, W, C)
            ax = axes[row, c]
            ax.imshow(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(title, fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
