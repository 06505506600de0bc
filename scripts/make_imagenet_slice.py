"""An ImageNet-shaped slice for the smoke run: 1000 classes x N procedural RGB images, as Parquet.

``python scripts/make_imagenet_slice.py --out runs/imagenet-slice [--per-class 2] [--size 64]``
writes ``<out>/imagenet-slice.parquet`` with the columns ImageNet's Parquet exports have
(``image`` as ``{bytes, path}`` structs of PNG bytes, integer ``label``), so
``jobs/configs/imagenet-smoke.yaml`` reads it exactly as ``imagenet.yaml`` reads the real
set. Images are drawn, not downloaded: per class a colour pair and a shape (disc, square,
stripes, checks), per image a seeded offset and noise, so classes differ and every run writes
the same bytes.

``--class-names`` prints the 1000 ImageNet class names (timm's bundled synset lemmas, first
lemma, the two names ImageNet repeats made distinct) as a YAML flow list: the
``ingest.class_names`` of both configs, so each class's prompt is its name.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

# ImageNet repeats two lemmas for different synsets; give each its own prompt.
DISTINCT = {134: "crane bird", 517: "construction crane", 639: "tank suit"}


def imagenet_class_names() -> list[str]:
    """The 1000 class names in label order, unique (timm's ImageNetInfo, no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [DISTINCT.get(k, info.index_to_description(k).split(",")[0].strip()) for k in range(info.num_classes())]
    assert len(set(names)) == len(names), "class names are not unique"
    return names


def draw(label: int, index: int, size: int, seed: int = 0) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``: the class's colours and shape, jittered."""
    crng = np.random.default_rng([seed, label])
    fg, bg = crng.integers(0, 256, 3), crng.integers(0, 256, 3)
    shape, freq = label % 4, 2 + (label // 4) % 6
    rng = np.random.default_rng([seed, label, index])
    dy, dx = rng.uniform(-0.15, 0.15, 2)
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    y, x = y - dy, x - dx
    if shape == 0:
        mask = x * x + y * y < 0.09
    elif shape == 1:
        mask = (np.abs(x) < 0.25) & (np.abs(y) < 0.25)
    elif shape == 2:
        mask = np.sin(2 * np.pi * freq * x) > 0
    else:
        mask = (np.sin(2 * np.pi * freq * x) > 0) ^ (np.sin(2 * np.pi * freq * y) > 0)
    img = np.where(mask[..., None], fg, bg).astype(np.float32)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_slice(out: str | Path, per_class: int = 2, size: int = 64, num_classes: int = 1000, seed: int = 0) -> Path:
    """Write the slice to ``out/imagenet-slice.parquet`` and return that path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for label in range(num_classes):
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(draw(label, i, size, seed)).save(buf, format="PNG")
            images.append({"bytes": buf.getvalue(), "path": f"{label:04d}_{i:04d}.png"})
            labels.append(label)
    table = pa.table({"image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels, pa.int64())})
    path = out / "imagenet-slice.parquet"
    tmp = out / ".imagenet-slice.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(path)  # a local scratch file, not a contract dataset
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory to write imagenet-slice.parquet into")
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--class-names", action="store_true", help="print the class names as a YAML flow list and exit")
    args = ap.parse_args(argv)
    if args.class_names:
        print(json.dumps(imagenet_class_names()))
        return 0
    if not args.out:
        ap.error("--out is required")
    path = make_slice(args.out, args.per_class, args.size, seed=args.seed)
    print(f"wrote {path}: 1000 classes x {args.per_class} images at {args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
