"""Training-time augmentation with timm's pieces, seeded per sample, run inside Ray Data.

* ``build_transform`` is timm's ``create_transform`` (RandomResizedCrop, RandAugment,
  random erasing, normalisation to [-1, 1]) for the classifier's input size.
* ``TrainCollate`` is the ``collate_fn`` the training loop hands to Ray Data's
  ``iter_torch_batches``: Ray runs it in its prefetch thread pool, so decoding-side work
  and augmentation stay off the training loop's critical path.
* ``MixupCutmix`` wraps timm's ``Mixup`` (Mixup / CutMix with label smoothing), applied
  to each batch in the loop, as timm's own trainer does.

Determinism: timm's transforms draw from Python's ``random`` and NumPy's global RNG. Each
sample's draws are made under one lock, right after seeding both from
(seed, epoch, pass, row id), so a sample's augmentation depends only on those numbers --
not on the batch size, the number of workers, the thread that ran it, or a restart. The
horizontal flip (torchvision's uses the thread-shared torch RNG) is applied here from the
same per-sample stream instead. Nothing in the transform draws from torch's global RNG
(random erasing is in ``const`` mode), so dropout in the training thread is unaffected.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import torch
from PIL import Image, ImageOps

from synthaug.config import ClassifyConfig

_RNG_LOCK = threading.Lock()  # the global Python / NumPy RNGs are shared by all threads


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
    )


def _to_pil(img: np.ndarray) -> Image.Image:
    """uint8 (C, H, W) -> PIL ``L`` or ``RGB``."""
    return Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))


class TrainCollate:
    """Ray Data ``collate_fn``: a numpy batch {image uint8 (B, C, H, W), label, domain, row} -> tensors.

    With ``cfg.augment`` off it only converts to float in [-1, 1]. ``epoch`` salts the
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
            x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
        else:
            x = torch.stack([self._one(img, int(row)) for img, row in zip(images, batch["row"])])
        return {
            "image": x.contiguous(),  # (B, C, H, W) float32
            "label": torch.tensor(np.asarray(batch["label"]), dtype=torch.int64),
            "domain": torch.tensor(np.asarray(batch["domain"]), dtype=torch.bool),  # True = synthetic
        }

    def _one(self, img: np.ndarray, row: int) -> torch.Tensor:
        pil = _to_pil(img)
        s = _seed(self.seed, self.epoch, self.pass_, row)
        with _RNG_LOCK:
            random.seed(s)
            np.random.seed(s % (2**32))
            if self.hflip > 0 and random.random() < self.hflip:
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
        with _RNG_LOCK:
            np.random.seed(seed % (2**32))
            return self.mixup(x, y)


def enabled(cfg: ClassifyConfig) -> bool:
    """Whether Mixup / CutMix is on."""
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
