"""Ingest real labelled images into contract datasets: ``train``, ``val`` and (low-data) ``pool``.

Sources: scikit-learn's bundled ``load_digits`` (the offline default), an image folder
``root/<class>/<image>`` (PNG, JPEG, WebP) and a Parquet file or directory with image and
label columns. Everything is read and checked before anything is written, so bad input
fails with a message naming the file, row or class and leaves earlier outputs untouched.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from synthaug.artifacts import UNLABELLED, DatasetError, write_dataset
from synthaug.config import Config, IngestConfig, to_dict
from synthaug.data.images import encode_png

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass
class RawImages:
    """Decoded, normalised images of one source, before splitting."""

    ids: list[str]
    images: list[np.ndarray]  # uint8 (H, W) or (H, W, 3)
    labels: np.ndarray
    class_names: list[str]


# ----------------------------------------------------------------------------- sources


def load_digits_source() -> RawImages:
    """scikit-learn's bundled 8x8 digits, scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    ids = [f"digits-{i:04d}" for i in range(len(imgs))]
    return RawImages(ids, list(imgs), d.target.astype(np.int64), [str(c) for c in d.target_names])


def _open_image(src, where: str) -> Image.Image:
    """Open and fully decode one image; truncated or unreadable files raise naming ``where``."""
    try:
        img = Image.open(src)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{where}: unreadable or truncated image ({e})") from None


def _normalise(imgs: list[Image.Image], wheres: list[str], cfg: IngestConfig) -> list[np.ndarray]:
    """Bring images to one mode and size as the config says, or raise naming the odd file."""
    modes = {im.mode for im in imgs}
    if not cfg.mode and len(modes) > 1:
        first = imgs[0].mode
        odd = next(i for i, im in enumerate(imgs) if im.mode != first)
        raise DatasetError(
            f"{wheres[odd]}: image mode {imgs[odd].mode!r} differs from {first!r} ({wheres[0]}); "
            "mixed image modes -- set ingest.mode to 'L' or 'RGB' to convert them"
        )
    target_mode = cfg.mode or next(iter(modes))
    if target_mode not in ("L", "RGB"):
        target_mode = "RGB"  # palette, RGBA, CMYK ... -> RGB
    out, size0 = [], None
    for im, where in zip(imgs, wheres):
        im = im.convert(target_mode) if im.mode != target_mode else im
        if cfg.image_size:
            im = im.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
        elif size0 is None:
            size0 = (im.size, where)
        elif im.size != size0[0]:
            raise DatasetError(
                f"{where}: size {im.size} differs from {size0[0]} ({size0[1]}); set ingest.image_size to resize"
            )
        out.append(np.asarray(im, dtype=np.uint8))
    return out


def load_imagefolder_source(cfg: IngestConfig) -> RawImages:
    """``root/<class>/<image>``; class names are the sorted folder names."""
    root = Path(cfg.path)
    if not cfg.path or not root.is_dir():
        raise DatasetError(f"ingest.path: image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folders (expected root/<class>/<image>)")
    files, labels = [], []
    for k, c in enumerate(classes):
        found = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DatasetError(f"{root / c}: empty class folder '{c}' (no .png/.jpg/.jpeg/.webp files)")
        files += found
        labels += [k] * len(found)
    imgs = [_open_image(f, str(f)) for f in files]
    arrays = _normalise(imgs, [str(f) for f in files], cfg)
    ids = [str(f.relative_to(root)) for f in files]
    return RawImages(ids, arrays, np.asarray(labels, dtype=np.int64), classes)


def load_parquet_source(cfg: IngestConfig) -> RawImages:
    """A Parquet file/dir with an encoded-image column and an integer label column."""
    path = Path(cfg.path)
    if not cfg.path or not path.exists():
        raise DatasetError(f"ingest.path: Parquet source {path} does not exist")
    table = pq.read_table(path)
    for key, col in (("ingest.image_column", cfg.image_column), ("ingest.label_column", cfg.label_column)):
        if col not in table.column_names:
            raise DatasetError(f"{path}: no column '{col}' (from {key}); columns are {table.column_names}")
    labels = np.asarray(table.column(cfg.label_column).to_pylist())
    if labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: label column '{cfg.label_column}' must hold integers, got {labels.dtype}")
    n_classes = len(cfg.class_names) if cfg.class_names else int(labels.max()) + 1
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        r = int(bad[0])
        raise DatasetError(f"{path}: row {r}: label {labels[r]} out of range [0, {n_classes}) in column '{cfg.label_column}'")
    class_names = [str(c) for c in cfg.class_names] or [str(k) for k in range(n_classes)]
    imgs, wheres = [], []
    for r, cell in enumerate(table.column(cfg.image_column).to_pylist()):
        where = f"{path} row {r}"
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, (bytes, bytearray)):
            raise DatasetError(f"{where}: column '{cfg.image_column}' holds {type(data).__name__}, not image bytes")
        imgs.append(_open_image(io.BytesIO(data), where))
        wheres.append(where)
    arrays = _normalise(imgs, wheres, cfg)
    ids = [f"{path.stem}-{r:07d}" for r in range(len(arrays))]
    return RawImages(ids, arrays, labels.astype(np.int64), class_names)


# ----------------------------------------------------------------------------- split


def split_indices(labels: np.ndarray, class_names: list[str], cfg: IngestConfig) -> dict[str, np.ndarray]:
    """Stable, seeded, per-class train/val split, then the k-per-class low-data cut."""
    rng = np.random.default_rng(cfg.seed)
    parts = {"train": [], "val": [], "pool": [], "train_full": []}
    for k, name in enumerate(class_names):
        idx = np.flatnonzero(labels == k)
        if idx.size < 2:
            raise DatasetError(f"class '{name}' has {idx.size} image(s); need at least 2 for a train/val split")
        idx = idx[rng.permutation(idx.size)]
        n_val = max(1, int(round(cfg.val_fraction * idx.size)))
        val, train = idx[:n_val], idx[n_val:]
        if cfg.k_per_class:
            if cfg.k_per_class > train.size:
                raise DatasetError(
                    f"ingest.k_per_class={cfg.k_per_class} is larger than class '{name}', "
                    f"which has {train.size} train images"
                )
            parts["train_full"].append(train)  # the evaluation oracle's training set
            train, pool = train[: cfg.k_per_class], train[cfg.k_per_class :]
            parts["pool"].append(pool)
        parts["train"].append(train)
        parts["val"].append(val)
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}


def _table(raw: RawImages, idx: np.ndarray, labelled: bool) -> pa.Table:
    return pa.table({
        "id": [raw.ids[i] for i in idx],
        "image": pa.array([encode_png(raw.images[i]) for i in idx], pa.binary()),
        "label": pa.array([int(raw.labels[i]) if labelled else UNLABELLED for i in idx], pa.int64()),
        "class_name": [raw.class_names[raw.labels[i]] if labelled else "" for i in idx],
        "source": ["real"] * len(idx),
    })


def load_source(cfg: IngestConfig) -> RawImages:
    if cfg.source == "digits":
        return load_digits_source()
    if cfg.source == "imagefolder":
        return load_imagefolder_source(cfg)
    return load_parquet_source(cfg)


def run(cfg: Config, out_dir: str | Path) -> dict[str, dict]:
    """Ingest per ``cfg.ingest`` into ``out_dir/{train,val[,pool,train_full]}``; returns manifests.

    In the low-data regime ``train`` keeps k labelled images per class, ``pool`` holds the
    rest of the train split without labels, and ``train_full`` the whole labelled train
    split. ``train_full`` is used only to train the evaluation's in-domain feature
    extractor (an oracle, like ImageNet-trained Inception), never by the generator or
    the classifiers being compared.
    """
    raw = load_source(cfg.ingest)
    parts = split_indices(raw.labels, raw.class_names, cfg.ingest)
    h, w = raw.images[0].shape[:2]
    channels = 1 if raw.images[0].ndim == 2 else raw.images[0].shape[2]
    manifests = {}
    for split, idx in parts.items():
        if split == "pool" and (not cfg.ingest.k_per_class or not cfg.ingest.unlabelled_pool):
            continue
        if split == "train_full" and not cfg.ingest.k_per_class:
            continue
        labelled = split != "pool"
        manifests[split] = write_dataset(
            _table(raw, idx, labelled), Path(out_dir) / split,
            class_names=raw.class_names, image_size=(h, w), channels=channels,
            config=to_dict(cfg), labelled=labelled, extra={"stage": "ingest", "split": split, "source": cfg.ingest.source},
        )
    return manifests
