"""Training-time augmentation with timm's pieces, seeded per sample, run inside Ray Data.

* ``build_transform`` is timm's ``create_transform`` (RandomResizedCrop, RandAugment,
  random erasing, normalisation to [-1, 1]) for the classifier's input size.
* ``TrainCollate`` is the ``collate_fn`` the training loop hands to Ray Data's
  ``iter_torch_batches``: Ray runs it in its prefetch thread pool, so decoding-side work
  and augmentation stay off the training loop's critical path.
* ``MixupCutmix`` wraps timm's ``Mixup`` (Mixup / CutMix with label smoothing), applied
  to each batch in the loop, as timm's own trainer does.

Determinism: timm's transforms and Mixup draw from Python's ``random`` and NumPy's global
RNG. Those are shared with every other thread of the process, and a Ray Train worker has
several (Ray's own threads draw from them too), so seeding them cannot make a run
repeatable -- measured: two identical Ray Train runs differed. Instead, ``_install_rngs``
points the ``random`` and ``np`` names *inside timm's data modules* at thread-local
generators, which ``seeded`` reseeds per sample from (seed, epoch, pass, id hash) and per
Mixup step. A sample's augmentation then depends only on those numbers -- not on the
batch size, the number of workers, the thread that ran it, or a restart -- and nothing
else in the process sees a different RNG (threads that never call ``seeded`` fall through
to the global generators, as before). The horizontal flip (torchvision's uses the torch
RNG) is drawn from the same per-sample stream here. Nothing in the default transform draws
from torch's RNG (random erasing is in ``const`` mode; color jitter, which does, is off unless
``classify.color_jitter`` > 0), so dropout is unaffected.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import threading

import numpy as np
import torch
from PIL import Image, ImageOps
from ray.data.collate_fn import NumpyBatchCollateFn

from synthaug.config import ClassifyConfig
from synthaug.data.images import to_float

_LOCAL = threading.local()  # .py: random.Random, .np: np.random.RandomState, set by `seeded`
# timm modules whose module-level `random` / `np` draw the augmentation and Mixup numbers.
_TIMM_RNG_USERS = {
    "timm.data.transforms": ("random", "np"),
    "timm.data.auto_augment": ("random", "np"),
    "timm.data.random_erasing": ("random",),
    "timm.data.mixup": ("np",),
}


class _PyRandom:
    """Stands in for the ``random`` module: this thread's seeded generator, else the global one."""

    def __getattr__(self, name):
        return getattr(getattr(_LOCAL, "py", None) or random, name)


class _NpRandom:
    def __getattr__(self, name):
        seed = getattr(_LOCAL, "np_seed", None)
        if seed is None:
            return getattr(np.random, name)
        if _LOCAL.np is None:  # built on first use: most transforms only draw from `random`
            _LOCAL.np = np.random.RandomState(seed % (2**32))
        return getattr(_LOCAL.np, name)


class _Numpy:
    """Stands in for ``numpy``: ``np.random`` is this thread's generator, everything else is numpy."""

    random = _NpRandom()

    def __getattr__(self, name):
        return getattr(np, name)


_INSTALLED = False


def _install_rngs() -> None:
    """Point timm's data modules at the thread-local generators (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    for module_name, names in _TIMM_RNG_USERS.items():
        module = importlib.import_module(module_name)
        for name in names:
            if not hasattr(module, name):
                raise RuntimeError(f"{module_name} has no module-level {name!r}: timm changed; update _TIMM_RNG_USERS")
            setattr(module, name, _PyRandom() if name == "random" else _Numpy())
    _INSTALLED = True


@contextlib.contextmanager
def seeded(seed: int):
    """timm's draws in this thread come from generators seeded with ``seed`` inside the block."""
    _install_rngs()
    _LOCAL.py, _LOCAL.np, _LOCAL.np_seed = random.Random(seed), None, seed
    try:
        yield _LOCAL.py
    finally:
        _LOCAL.py = _LOCAL.np = _LOCAL.np_seed = None


def _seed(seed: int, *salt: int) -> int:
    return int(np.random.SeedSequence([int(seed), *salt]).generate_state(1)[0])


def build_transform(cfg: ClassifyConfig, in_chans: int, image_size: tuple[int, int]):
    """timm ``create_transform`` for training: PIL image -> float (C, H, W) in [-1, 1]."""
    from timm.data import create_transform

    return create_transform(
        input_size=(int(in_chans), *map(int, image_size)),
        is_training=True,
        scale=tuple(cfg.crop_scale),
        ratio=tuple(cfg.crop_ratio),
        hflip=0.0,  # applied by TrainCollate from the per-sample stream (see module docstring)
        vflip=0.0,
        auto_augment=cfg.auto_augment or None,
        interpolation="bilinear",
        mean=(0.5,) * in_chans,  # (x - 0.5) / 0.5: the [-1, 1] range of synthaug.data.images.to_float
        std=(0.5,) * in_chans,
        re_prob=cfg.re_prob,
        re_mode="const",
        re_count=1,
        # torchvision's ColorJitter draws from torch's global RNG (shared with dropout in the
        # training thread), so it is only added when asked for, and such runs do not repeat exactly.
        color_jitter=cfg.color_jitter if cfg.color_jitter > 0 else None,
    )


def _to_pil(img: np.ndarray) -> Image.Image:
    """uint8 (C, H, W) -> PIL ``L`` or ``RGB``."""
    return Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))


class TrainCollate(NumpyBatchCollateFn):
    """Ray Data ``collate_fn``: a numpy batch {image uint8 (B, C, H, W), label, domain, key} -> tensors.

    ``key`` is the row's stable per-id hash (``artifacts.id_hashes``), the per-sample seed's
    key. With ``cfg.augment`` off it only converts to float in [-1, 1]. ``epoch`` salts the
    per-sample seeds, so each epoch sees fresh augmentations.
    """

    def __init__(self, cfg: ClassifyConfig, in_chans: int, image_size, seed: int, epoch: int):
        self.augment, self.hflip = bool(cfg.augment), float(cfg.hflip)
        self.transform = build_transform(cfg, in_chans, image_size) if self.augment else None
        self.seed, self.epoch, self.pass_ = int(seed), int(epoch), 0

    def for_pass(self, pass_: int) -> "TrainCollate":
        """The same collate for the ``pass_``-th pass over the shard within one epoch (fresh draws)."""
        other = object.__new__(TrainCollate)
        other.__dict__.update(self.__dict__, pass_=int(pass_))
        return other

    def __call__(self, batch: dict) -> dict:
        images = np.asarray(batch["image"])  # (B, C, H, W) uint8
        if self.transform is None:
            x = torch.from_numpy(to_float(images))
        else:
            x = torch.stack([self._one(img, int(key)) for img, key in zip(images, batch["key"])])
        return {
            "image": x.contiguous(),  # (B, C, H, W) float32
            "label": torch.tensor(np.asarray(batch["label"]), dtype=torch.int64),
            "domain": torch.tensor(np.asarray(batch["domain"]), dtype=torch.bool),  # True = synthetic
        }

    def _one(self, img: np.ndarray, key: int) -> torch.Tensor:
        pil = _to_pil(img)
        with seeded(_seed(self.seed, self.epoch, self.pass_, key)) as rng:
            if self.hflip > 0 and rng.random() < self.hflip:
                pil = ImageOps.mirror(pil)
            return self.transform(pil)


class MixupCutmix:
    """timm ``Mixup`` with per-step seeding; returns (images, soft targets). Wants an even batch."""

    def __init__(self, cfg: ClassifyConfig, num_classes: int):
        from timm.data import Mixup

        self.mixup = Mixup(
            mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with seeded(seed):
            return self.mixup(x, y)


def enabled(cfg: ClassifyConfig) -> bool:
    """Whether Mixup / CutMix is on."""
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
