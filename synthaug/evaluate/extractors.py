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

``ContractImages`` serves a contract dataset's images to torch-fidelity as uint8 tensors.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from synthaug.artifacts import DatasetError, read_manifest, read_table, sha256_file
from synthaug.data.images import decode_png

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


class ExtractorError(ValueError):
    """A feature extractor cannot be built: missing or unverified weights, or a bad classifier dir."""


# ----------------------------------------------------------------------------- images


class ContractImages(Dataset):
    """A contract dataset as uint8 ``(3, H, W)`` tensors; grayscale is repeated to 3 channels.

    No resize happens here: the in-domain extractor sees the native size, and
    torch-fidelity's Inception resizes to 299x299 inside its forward. Every image must
    have the manifest's size (checked from the PNG headers up front), so batches stack.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        table = read_table(self.path, columns=["id", "image", "label"])
        if table.num_rows == 0:
            raise DatasetError(f"{self.path}: empty dataset (0 rows); nothing to measure")
        self.ids = table.column("id").to_pylist()
        self.images = table.column("image").to_pylist()
        self.labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
        h, w = self.manifest["image_size"]
        for rid, data in zip(self.ids, self.images):
            size = Image.open(io.BytesIO(data)).size  # (W, H) from the header, no decode
            if size != (w, h):
                raise DatasetError(
                    f"{self.path}: image {rid!r} is {size[1]}x{size[0]}, the manifest says {h}x{w}; "
                    "a dataset must hold one image size"
                )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = torch.tensor(decode_png(self.images[i])).permute(2, 0, 1)  # (C, H, W), a writable copy
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img[:3].contiguous()


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
        self.model, self.meta = load_classifier(feature_extractor_weights_path)
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
    """A resolved extractor: what runs, from which verified weights, for which metrics."""

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


def verify_inception_weights(path: str | Path, expected_sha256: str = "") -> str:
    """Check a local Inception weights file against its sha256; return the digest."""
    how = (
        f"download it once, outside the job: curl -L -o <path> {INCEPTION_WEIGHTS_URL} "
        f"(sha256 {INCEPTION_WEIGHTS_SHA256}), and pass that path as inception_weights"
    )
    if not path:
        raise ExtractorError(f"extractor 'inception-v3-compat' needs a local weights file and never downloads; {how}")
    p = Path(path)
    if not p.is_file():
        raise ExtractorError(f"Inception weights not found at {p}; {how}")
    want = (expected_sha256 or INCEPTION_WEIGHTS_SHA256).lower()
    got = sha256_file(p)
    if got != want:
        raise ExtractorError(f"Inception weights at {p} have sha256 {got}, expected {want}; the file is wrong or damaged -- {how}")
    return got


def resolve_extractor(kind: str, extractor_dir: str | Path | None, inception_weights: str = "", expected_sha256: str = "") -> Extractor:
    """Check the extractor's weights exist (and, for Inception, verify them) before any work."""
    if kind == "in-domain":
        d = Path(extractor_dir) if extractor_dir else None
        if d is None or not (d / "classifier.json").is_file() or not (d / "model.safetensors").is_file():
            raise ExtractorError(
                f"extractor 'in-domain' needs a saved classifier directory (classifier.json + model.safetensors); "
                f"got {str(d)!r}. Train one on the real train split first (synthaug classifier training)."
            )
        meta = json.loads((d / "classifier.json").read_text())
        return Extractor(kind, str(d), sha256_file(d / "model.safetensors"), True, meta)
    if kind == "inception-v3-compat":
        digest = verify_inception_weights(inception_weights, expected_sha256)
        return Extractor(kind, str(inception_weights), digest, False)
    raise ExtractorError(f"config key 'evaluate.extractor': unknown extractor {kind!r}; choose from {sorted(METRIC_LAYERS)}")


def build_extractor(ex: Extractor, layers, device: str = "cpu") -> FeatureExtractorBase:
    """The torch-fidelity extractor object, from local weights only."""
    return create_feature_extractor(
        ex.tf_name, sorted(set(layers)), cuda=device.startswith("cuda"), feature_extractor_weights_path=ex.weights_path, verbose=False
    )


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
