"""Lossless PNG encoding of uint8 images, and batch decoding to arrays.

Every image synthaug decodes (an ingest source's file or row, a contract dataset's PNG in
any stage, in the driver or inside a Ray task) goes through :func:`open_image`, so
whatever Pillow raises on bad data (truncated or corrupt files, a text file named
``.png``, a decompression bomb, ...) becomes one :class:`~synthaug.artifacts.DatasetError`
naming the file or row, not a decoder traceback behind Ray's wrapper.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from synthaug.artifacts import DatasetError


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG bytes."""
    if img.dtype != np.uint8:
        raise TypeError(f"encode_png wants uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def open_image(src, where: str) -> Image.Image:
    """Open and fully decode one image (a file object or bytes); any decoder error raises naming ``where``."""
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
        img.load()
        return img
    except UnidentifiedImageError:
        raise DatasetError(f"{where}: unreadable or truncated image (not an image format PIL can read)") from None
    except Exception as e:  # OSError (truncated), SyntaxError (bad chunk), DecompressionBombError, ValueError ...
        raise DatasetError(f"{where}: unreadable or truncated image ({type(e).__name__}: {e})") from None


def decode_png(data: bytes, where: str = "image") -> np.ndarray:
    """PNG bytes -> uint8 (H, W, C) with C in {1, 3}; bad data raises naming ``where``."""
    arr = np.asarray(open_image(data, where))
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_batch(images, ids=None, where: str = "") -> np.ndarray:
    """A column of PNG bytes -> uint8 (B, C, H, W); a bad image raises naming ``where`` and its row id."""
    ids = list(ids) if ids is not None else [f"#{k} of a batch" for k in range(len(images))]
    arrs = [decode_png(b, f"{where + ': ' if where else ''}row {i!r}") for i, b in zip(ids, images)]
    return np.stack(arrs).transpose(0, 3, 1, 2).copy()


def to_float(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (B, C, H, W) -> float32 in [-1, 1], the generator's and classifier's input range."""
    return images_u8.astype(np.float32) / 127.5 - 1.0


def from_float(x) -> np.ndarray:
    """float in [-1, 1] (B, C, H, W) tensor/array -> uint8 (B, C, H, W), rounded."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
