"""Lossless PNG encoding of uint8 images, and batch decoding to arrays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG bytes."""
    if img.dtype != np.uint8:
        raise TypeError(f"encode_png wants uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, C) with C in {1, 3}."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_batch(images) -> np.ndarray:
    """A column of PNG bytes -> uint8 (B, C, H, W)."""
    arrs = [decode_png(b) for b in images]
    return np.stack(arrs).transpose(0, 3, 1, 2).copy()


def to_float(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (B, C, H, W) -> float32 in [-1, 1], the generator's and classifier's input range."""
    return images_u8.astype(np.float32) / 127.5 - 1.0


def from_float(x) -> np.ndarray:
    """float in [-1, 1] (B, C, H, W) tensor/array -> uint8 (B, C, H, W), rounded."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
