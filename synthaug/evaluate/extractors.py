"""Feature extractors for the fidelity metrics, registered with torch-fidelity; offline only.

Extractors (``EvaluateConfig.extractor``):

- ``in-domain`` (default, offline): a saved synthaug classifier (``load_classifier``),
  registered with torch-fidelity as ``synthaug-in-domain``. It sees images at their
  native size (no resize), so the real and synthetic sets must share one size. FID, KID
  and precision/recall use its pooled penultimate features (``pre_logits``), IS its
  logits. Numbers are comparable only between runs with the same extractor weights,
  which is why ``extractor_hash`` is in every result.
- ``inception-v3-compat``: torch-fidelity's TF-ported InceptionV3, which resizes every
  image to 299x299 internally. Its weights are read only from a local file whose sha256
  is checked first (see :data:`INCEPTION_WEIGHTS_URL`); it never downloads.

Precision/recall use the same extractor as the other metrics (torch-fidelity's default
for PR is VGG16, another download), so PR numbers are not comparable with published
VGG16-based ones.

:func:`decode_images` turns a batch of PNGs into the uint8 tensors torch-fidelity reads, and
:func:`extract_batch` runs an extractor on one batch: the Ray-free compute core that the
Ray Data actors of :mod:`synthaug.evaluate.features` wrap. ``ContractImages`` serves a
small, bounded dataset to torch-fidelity's own entry point (tests).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from synthaug import storage
from synthaug.artifacts import DatasetError, read_manifest, read_table, sha256_file
from synthaug.data.images import decode_png
from synthaug.errors import InputError

IN_DOMAIN = "synthaug-in-domain"  # torch-fidelity registry name of the in-domain extractor
INCEPTION = "inception-v3-compat"  # torch-fidelity's own registry name

# Official torch-fidelity InceptionV3 weights (TF 2015-12-05 graph, converted): fetch once,
# outside any job, e.g. `curl -L -o inception.pth <URL>`. 95,628,359 bytes.
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

# Which feature layer each metric reads, per extractor (the extractor is one per call).
METRIC_LAYERS = {
    "in-domain": {"fid": "pre_logits", "isc": "logits", "kid": "pre_logits", "prc": "pre_logits"},
    "inception-v3-compat": {"fid": "2048", "isc": "logits_unbiased", "kid": "2048", "prc": "2048"},
}
TF_NAMES = {"in-domain": IN_DOMAIN, "inception-v3-compat": INCEPTION}


class ExtractorError(InputError, ValueError):
    """A feature extractor cannot be built: missing or unverified weights, or a bad classifier dir."""


# ----------------------------------------------------------------------------- images


def decode_images(pngs, ids, image_size, where) -> np.ndarray:
    """PNG bytes of one batch -> uint8 ``(B, 3, H, W)``; grayscale is repeated to 3 channels.

    No resize happens here: the in-domain extractor sees the native size, and
    torch-fidelity's Inception resizes to 299x299 inside its forward. Every image must
    have the manifest's ``image_size`` (H, W), so batches stack; a bad one is named.
    """
    h, w = (int(v) for v in image_size)
    out = np.empty((len(pngs), 3, h, w), np.uint8)
    for k, (rid, data) in enumerate(zip(ids, pngs)):
        img = decode_png(data, f"{where}: row {rid!r}")  # (H, W, C)
        if img.shape[:2] != (h, w):
            raise DatasetError(
                f"{where}: image {rid!r} is {img.shape[0]}x{img.shape[1]}, the manifest says {h}x{w}; "
                "a dataset must hold one image size"
            )
        out[k] = img.transpose(2, 0, 1)[:3] if img.shape[2] >= 3 else np.repeat(img.transpose(2, 0, 1)[:1], 3, axis=0)
    return out


class ContractImages(Dataset):
    """A *bounded* contract dataset as uint8 ``(3, H, W)`` tensors, for torch-fidelity's own entry point.

    It reads the whole set into memory, so it serves only tests and small comparisons
    (e.g. against ``torch_fidelity.calculate_metrics``); the evaluate stage streams
    through :mod:`synthaug.evaluate.features` instead.
    """

    def __init__(self, path: str | Path):
        self.path = path
        self.manifest = read_manifest(path)
        table = read_table(path, columns=["id", "image", "label"])
        if table.num_rows == 0:
            raise DatasetError(f"{path}: empty dataset (0 rows); nothing to measure")
        self.labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
        self.images = decode_images(table.column("image").to_pylist(), table.column("id").to_pylist(),
                                    self.manifest["image_size"], path)  # (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i].copy())  # (3, H, W)


# ----------------------------------------------------------------------------- extractors


class InDomainFeatureExtractor(FeatureExtractorBase):
    """A saved synthaug classifier as a torch-fidelity feature extractor.

    ``feature_extractor_weights_path`` is the classifier directory (``model.safetensors``
    + ``classifier.json``). Input: uint8 ``(B, 3, H, W)`` at the classifier's native size;
    a 1-channel classifier reads channel 0. Features: ``pre_logits`` (pooled penultimate
    features) and ``logits``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from synthaug.classify.models import load_classifier

        vassert(bool(feature_extractor_weights_path), f"{name}: pass the classifier directory as feature_extractor_weights_path")
        self.model, self.meta = load_classifier(storage.localize(feature_extractor_weights_path))
        self.in_chans = int(self.meta["in_chans"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "pre_logits", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return METRIC_LAYERS["in-domain"][metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        if self.in_chans == 1:
            x = x[:, :1]  # (B, 1, H, W): the dataset repeated gray to 3 channels
        x = x.to(torch.float32) / 127.5 - 1.0  # as images.to_float: [-1, 1]
        fmap = self.model.forward_features(x)  # (B, F, h, w)
        feats = {
            "pre_logits": self.model.forward_head(fmap, pre_logits=True),  # (B, F)
            "logits": self.model.forward_head(fmap),  # (B, K)
        }
        return tuple(feats[n].to(torch.float32) for n in self.features_list)


if IN_DOMAIN not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(IN_DOMAIN, InDomainFeatureExtractor)


@dataclass(frozen=True)
class Extractor:
    """A resolved extractor: what runs, from which verified weights, for which metrics.

    ``weights_path`` is a location (local, mounted or ``s3://...``); :meth:`local_weights`
    gives a local copy, cached under the weights' sha256, wherever the extractor runs
    (driver or a Ray actor on another node).
    """

    kind: str  # 'in-domain' or 'inception-v3-compat'
    weights_path: str  # classifier dir (in-domain) or weights file (inception)
    weights_sha256: str
    native_size: bool  # True: no resize, so both sets need one image size
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> dict:
        return METRIC_LAYERS[self.kind]

    @property
    def tf_name(self) -> str:
        return TF_NAMES[self.kind]

    def local_weights(self) -> str:
        """A local path of the weights (the location itself when it is local)."""
        if self.kind == "in-domain":
            return str(storage.localize(self.weights_path, key=f"clf-{self.weights_sha256[:32]}"))
        return str(_localize_file(self.weights_path, self.weights_sha256))


def _localize_file(loc: str, sha256: str) -> Path:
    """A local copy of one file at a location, cached by its content hash."""
    lp = storage.local_path(loc)
    if lp is not None:
        return lp
    dst = storage.cache_root() / f"file-{sha256[:32]}" / storage.basename(loc)
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(storage.read_bytes(loc))
        os.replace(tmp, dst)  # a local cache file, not a data location
    return dst


def verify_inception_weights(path: str | Path, expected_sha256: str = "") -> str:
    """Check an Inception weights file (any location) against its sha256; return the digest."""
    how = (
        f"download it once, outside the job: curl -L -o <path> {INCEPTION_WEIGHTS_URL} "
        f"(sha256 {INCEPTION_WEIGHTS_SHA256}), and pass that path as inception_weights"
    )
    if not path:
        raise ExtractorError(f"extractor 'inception-v3-compat' needs a local weights file and never downloads; {how}")
    if not storage.is_file(path):
        raise ExtractorError(f"Inception weights not found at {path}; {how}")
    want = (expected_sha256 or INCEPTION_WEIGHTS_SHA256).lower()
    got = sha256_file(path)
    if got != want:
        raise ExtractorError(f"Inception weights at {path} have sha256 {got}, expected {want}; the file is wrong or damaged -- {how}")
    return got


def resolve_extractor(kind: str, extractor_dir: str | Path | None, inception_weights: str = "", expected_sha256: str = "") -> Extractor:
    """Check the extractor's weights exist (and, for Inception, verify them) before any work.

    ``extractor_dir`` (in-domain) and ``inception_weights`` may be any storage location.
    """
    if kind == "in-domain":
        d = str(extractor_dir) if extractor_dir else None
        if d is None or not storage.is_file(storage.join(d, "classifier.json")) or not storage.is_file(storage.join(d, "model.safetensors")):
            raise ExtractorError(
                f"extractor 'in-domain' needs a saved classifier directory (classifier.json + model.safetensors); "
                f"got {d!r}. Train one on the real train split first (synthaug classifier training)."
            )
        meta = json.loads(storage.read_text(storage.join(d, "classifier.json")))
        # An absolute location, so actors on other nodes (shared mount or URI) find the same weights.
        return Extractor(kind, storage.absolute(d), sha256_file(storage.join(d, "model.safetensors")), True, meta)
    if kind == "inception-v3-compat":
        digest = verify_inception_weights(inception_weights, expected_sha256)
        return Extractor(kind, storage.absolute(inception_weights), digest, False)
    raise ExtractorError(f"config key 'evaluate.extractor': unknown extractor {kind!r}; choose from {sorted(METRIC_LAYERS)}")


def build_extractor(ex: Extractor, layers, device: str = "cpu") -> FeatureExtractorBase:
    """The torch-fidelity extractor object, from local weights only (fetched once if remote)."""
    return create_feature_extractor(
        ex.tf_name, sorted(set(layers)), cuda=device.startswith("cuda"), feature_extractor_weights_path=ex.local_weights(),
        verbose=False,
    )


def extract_batch(fe: FeatureExtractorBase, images_u8: np.ndarray, device: str = "cpu") -> dict[str, np.ndarray]:
    """The Ray-free compute core: uint8 ``(B, 3, H, W)`` -> layer name -> float32 ``(B, D)``."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8))  # (B, 3, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    with torch.no_grad():
        feats = fe.convert_features_tuple_to_dict(fe(x.to(device)))
    return {name: v.detach().to("cpu", torch.float32).numpy() for name, v in feats.items()}


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
