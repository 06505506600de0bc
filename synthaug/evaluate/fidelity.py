"""Fidelity metrics (FID, IS, KID, precision/recall) of a synthetic set against a real one, offline.

Every number comes from torch-fidelity's own metric functions; synthaug only supplies
the images, the feature extractor and a content-keyed feature cache.

Extractors (``EvaluateConfig.extractor``): see :mod:`synthaug.evaluate.extractors`.

Small sets: a KID subset size above a set's size is lowered to it (with a warning, the
value used is in ``kid_subset_size``); FID from fewer than ``FID_SAMPLES_PER_DIM`` x the
feature dimension samples is computed but flagged (``fid_small_sample_warning``); sets
under ``MIN_SAMPLES`` images are refused; per-class FID needs ``PER_CLASS_MIN_COUNT``.

Why not ``torch_fidelity.calculate_metrics``: it has no input for precomputed features,
and its cache is keyed by a name, not by the images or the extractor weights (two
different sets with one name would share statistics). So features are extracted here,
through the registered torch-fidelity extractor, cached under a key of (dataset
content hash, extractor, weights sha256, sample count), and handed to the same
``*_featuresdict_to_metric`` functions ``calculate_metrics`` calls.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_featuresdict_to_metric

from synthaug.artifacts import DatasetError, hash_obj, read_manifest
from synthaug.config import EvaluateConfig
from synthaug.evaluate.extractors import (  # noqa: F401  (re-exported: fidelity's public names)
    IN_DOMAIN, INCEPTION, INCEPTION_WEIGHTS_SHA256, INCEPTION_WEIGHTS_URL, METRIC_LAYERS, TF_NAMES, ContractImages,
    Extractor, ExtractorError, InDomainFeatureExtractor, _device, build_extractor, resolve_extractor,
    verify_inception_weights,
)


ISC_SPLITS = 10  # torch-fidelity's default; lowered to the sample count for tiny sets
KID_SUBSETS = 100  # torch-fidelity's default
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k of the k-NN manifolds
MIN_SAMPLES = PRC_NEIGHBORHOOD + 1  # a k-NN radius needs k other points in the set
# FID's covariance estimate needs many more samples than feature dimensions; below this
# multiple of the feature dimension the score is biased upwards and unstable, so it is
# flagged (`fid_small_sample_warning`) rather than refused.
FID_SAMPLES_PER_DIM = 10
# Per-class FID is reported only with this many images of the class on each side;
# fewer make the class covariance mostly noise, so the entry is NaN instead.
PER_CLASS_MIN_COUNT = 20
CACHE_VERSION = 1

# Extractor forward calls (batches) per extractor kind, so callers can see cache reuse.
FORWARD_CALLS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- features


def _extract(dataset: Dataset, fe: FeatureExtractorBase, kind: str, batch_size: int, device: str) -> dict[str, np.ndarray]:
    """Run the extractor over a dataset in order; layer name -> float32 ``(N, D)``."""
    out = collections.defaultdict(list)
    loader = DataLoader(dataset, batch_size=max(1, min(batch_size, len(dataset))), shuffle=False, num_workers=0)
    with torch.no_grad():
        for batch in loader:  # (B, 3, H, W) uint8
            feats = fe.convert_features_tuple_to_dict(fe(batch.to(device)))
            FORWARD_CALLS[kind] += 1
            for name, v in feats.items():
                out[name].append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def cache_key(manifest: dict, ex: Extractor, layers) -> str:
    """Content key of a set's features: images (content hash), extractor, weights, count, layers."""
    return hash_obj(
        {
            "version": CACHE_VERSION,
            "content_hash": manifest["content_hash"],
            "extractor": ex.tf_name,
            "weights_sha256": ex.weights_sha256,
            "num_rows": manifest["num_rows"],
            "layers": sorted(set(layers)),
        }
    )


def dataset_features(
    path: str | Path,
    ex: Extractor,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    build=None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of every image (all metric layers) and the labels, cached by content.

    With ``cache_dir`` the features are kept in ``<cache_dir>/<kind>-<key>.npz``; the key
    changes with any image, label, the extractor weights or the sample count. ``build``
    (optional, no arguments) returns the extractor object, so callers can share one.
    """
    manifest = read_manifest(path)
    layers = sorted(set(ex.layers.values()))
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{ex.kind}-{cache_key(manifest, ex, layers)[:32]}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    return {n: z[f"layer_{n}"] for n in layers}, z["labels"]
            except (OSError, KeyError, ValueError) as e:
                warnings.warn(f"{cache_file}: unreadable feature cache ({e}); recomputing")

    # Extract through the registered torch-fidelity extractor.
    dev = _device(device)
    ds = ContractImages(path)
    fe = build() if build is not None else build_extractor(ex, layers, dev)
    feats = _extract(ds, fe, ex.kind, batch_size, dev)

    if cache_file is not None:  # atomic: a reader never sees half a file
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, labels=ds.labels, **{f"layer_{n}": feats[n] for n in layers})
        os.replace(tmp, cache_file)
    return feats, ds.labels


# ----------------------------------------------------------------------------- metrics


def fidelity_from_features(
    synth: dict[str, np.ndarray],
    real: dict[str, np.ndarray],
    layers: dict[str, str],
    kid_subset_size: int,
    *,
    isc_splits: int = ISC_SPLITS,
    kid_subsets: int = KID_SUBSETS,
    rng_seed: int = 2020,
) -> dict:
    """torch-fidelity's IS (of ``synth``), FID, KID and precision/recall from features.

    ``synth`` is torch-fidelity's input1 (generated) and ``real`` its input2, the
    convention its precision/recall assumes. ``layers`` maps metric -> feature name.
    A KID subset size above either set's size is lowered to the smaller set (with a
    warning), as is the number of IS splits; the values used are returned.
    """
    f1 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in synth.items()}
    f2 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in real.items()}
    n1, n2 = len(f1[layers["fid"]]), len(f2[layers["fid"]])
    if min(n1, n2) < MIN_SAMPLES:
        raise DatasetError(
            f"fidelity metrics need at least {MIN_SAMPLES} images per set (precision/recall's "
            f"{PRC_NEIGHBORHOOD}-NN radius); got {n1} synthetic and {n2} real"
        )
    subset = min(kid_subset_size, n1, n2)
    if subset < kid_subset_size:
        warnings.warn(f"KID subset size lowered from {kid_subset_size} to {subset}, the size of the smaller set")
    dim = int(f1[layers["fid"]].shape[1])
    small = min(n1, n2) < FID_SAMPLES_PER_DIM * dim
    if small:
        warnings.warn(
            f"FID from {min(n1, n2)} samples with {dim}-dim features (< {FID_SAMPLES_PER_DIM} x dim) is biased "
            "upwards and unstable; compare only FIDs of equal sample counts"
        )
    kw = dict(
        isc_splits=min(isc_splits, n1), kid_subsets=kid_subsets, kid_subset_size=subset,
        prc_neighborhood=PRC_NEIGHBORHOOD, rng_seed=rng_seed, verbose=False,
    )

    # The same torch-fidelity calls calculate_metrics makes, one extractor layer each.
    stats1 = fid_features_to_statistics(f1[layers["fid"]])
    stats2 = fid_features_to_statistics(f2[layers["fid"]])
    fid = fid_statistics_to_metric(stats1, stats2, False)
    isc = isc_featuresdict_to_metric(f1, layers["isc"], **kw)
    kid = kid_featuresdict_to_metric(f1, f2, layers["kid"], **kw)
    prc = prc_featuresdict_to_metric(f1, f2, layers["prc"], **kw)
    return {
        "fid": float(fid[KEY_METRIC_FID]),
        "isc_mean": float(isc[KEY_METRIC_ISC_MEAN]),
        "isc_std": float(isc[KEY_METRIC_ISC_STD]),
        "kid_mean": float(kid[KEY_METRIC_KID_MEAN]),
        "kid_std": float(kid[KEY_METRIC_KID_STD]),
        "precision": float(prc[KEY_METRIC_PRECISION]),
        "recall": float(prc[KEY_METRIC_RECALL]),
        "f_score": float(prc[KEY_METRIC_F_SCORE]),
        "n_real": n2,
        "n_synthetic": n1,
        "feature_dim": dim,
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
        "isc_splits": kw["isc_splits"],
        "fid_small_sample_warning": bool(small),
    }


def _check_pair(real_dir, synth_dir, ex: Extractor) -> tuple[dict, dict]:
    """Manifests of both sets, checked against each other and the extractor before any work."""
    mr, ms = read_manifest(real_dir), read_manifest(synth_dir)
    for path, m in ((real_dir, mr), (synth_dir, ms)):
        if m["num_rows"] == 0:
            raise DatasetError(f"{path}: empty dataset (0 rows); nothing to measure")
        if ex.kind == "in-domain" and m["channels"] != ex.meta["in_chans"]:
            raise DatasetError(
                f"{path}: {m['channels']}-channel images, but the in-domain extractor {ex.weights_path} "
                f"reads {ex.meta['in_chans']} channel(s)"
            )
    if ex.native_size:
        sizes = {tuple(mr["image_size"]), tuple(ms["image_size"])}
        want = ex.meta.get("image_size")
        if want:
            sizes.add(tuple(want) if isinstance(want, (list, tuple)) else (int(want), int(want)))
        if len(sizes) > 1:
            raise DatasetError(
                f"image sizes differ: real {real_dir} is {mr['image_size']}, synthetic {synth_dir} is "
                f"{ms['image_size']}" + (f", extractor {ex.weights_path} expects {want}" if want else "")
                + "; the in-domain extractor sees native size and does not resize -- resample a set to one "
                "size, or use 'inception-v3-compat', which resizes to 299"
            )
    return mr, ms


def _features_pair(real_dir, synth_dir, extractor_dir, cfg, cache_dir, inception_weights, expected_sha256, device):
    ex = resolve_extractor(cfg.extractor, extractor_dir, inception_weights, expected_sha256)
    mr, ms = _check_pair(real_dir, synth_dir, ex)
    dev = _device(device)
    build = functools.cache(lambda: build_extractor(ex, ex.layers.values(), dev))  # built once, only on a cache miss
    real = dataset_features(real_dir, ex, cfg.batch_size, cache_dir, dev, build)
    synth = dataset_features(synth_dir, ex, cfg.batch_size, cache_dir, dev, build)
    return ex, mr, ms, real, synth


def compute_fidelity(
    real_dir: str | Path,
    synth_dir: str | Path,
    extractor_dir: str | Path | None,
    cfg: EvaluateConfig,
    cache_dir: str | Path | None = None,
    *,
    inception_weights: str = "",
    expected_sha256: str = "",
    device: str | None = None,
) -> dict:
    """FID, IS, KID and precision/recall of ``synth_dir`` against ``real_dir``: a flat dict.

    ``extractor_dir`` is the in-domain classifier directory (ignored for Inception, which
    reads ``inception_weights``, verified against ``expected_sha256`` or the official
    checksum). Features of both sets are cached under ``cache_dir`` by content; ``None``
    disables the cache. Keys: fid, isc_mean, isc_std, kid_mean, kid_std, precision, recall,
    f_score, n_real, n_synthetic, feature_dim, kid_subset_size, kid_subsets, isc_splits,
    fid_small_sample_warning, extractor, extractor_hash, feature_layer_{fid,isc,kid,prc},
    real_content_hash, synthetic_content_hash.
    """
    ex, mr, ms, (fr, _), (fs, _) = _features_pair(
        real_dir, synth_dir, extractor_dir, cfg, cache_dir, inception_weights, expected_sha256, device
    )
    out = fidelity_from_features(fs, fr, ex.layers, cfg.kid_subset_size)
    out.update(
        extractor=ex.kind,
        extractor_hash=ex.weights_sha256,
        **{f"feature_layer_{m}": ex.layers[m] for m in ("fid", "isc", "kid", "prc")},
        real_content_hash=mr["content_hash"],
        synthetic_content_hash=ms["content_hash"],
    )
    return out


def compute_per_class_fid(
    real_dir: str | Path,
    synth_dir: str | Path,
    extractor_dir: str | Path | None,
    cfg: EvaluateConfig,
    cache_dir: str | Path | None = None,
    *,
    min_count: int = PER_CLASS_MIN_COUNT,
    inception_weights: str = "",
    expected_sha256: str = "",
    device: str | None = None,
) -> dict[str, dict]:
    """Per-class FID (torch-fidelity's arithmetic): class name -> {fid, n_real, n_synthetic}.

    ``fid`` is NaN where either side has fewer than ``min_count`` images of the class.
    Reuses the feature cache of :func:`compute_fidelity` when given the same ``cache_dir``.
    """
    ex, mr, ms, (fr, lr), (fs, ls) = _features_pair(
        real_dir, synth_dir, extractor_dir, cfg, cache_dir, inception_weights, expected_sha256, device
    )
    if list(mr["class_names"]) != list(ms["class_names"]):
        raise DatasetError(f"class names differ: real {real_dir} has {mr['class_names']}, synthetic {synth_dir} has {ms['class_names']}")
    layer = ex.layers["fid"]
    out = {}
    for k, name in enumerate(mr["class_names"]):
        r, s = fr[layer][lr == k], fs[layer][ls == k]
        fid = math.nan
        if min(len(r), len(s)) >= max(min_count, 2):
            st_s = fid_features_to_statistics(torch.from_numpy(s))
            st_r = fid_features_to_statistics(torch.from_numpy(r))
            fid = float(fid_statistics_to_metric(st_s, st_r, False)[KEY_METRIC_FID])
        out[name] = {"fid": fid, "n_real": int(len(r)), "n_synthetic": int(len(s))}
    return out


def make_feature_fn(extractor_dir: str | Path, batch_size: int = 64, layer: str = "pre_logits", device: str | None = None):
    """``uint8 (B, C, H, W) array -> float32 (B, D)`` through the in-domain extractor (for audits)."""
    ex = resolve_extractor("in-domain", extractor_dir)
    dev = _device(device)
    fe = build_extractor(ex, [layer], dev)

    def feature_fn(images_u8: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images_u8))  # (B, C, H, W)
        if len(x) == 0:
            return np.zeros((0, 0), np.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # as ContractImages hands images to the extractor
        return _extract(x, fe, ex.kind, batch_size, dev)[layer]

    return feature_fn


feature_fn = make_feature_fn  # the name synthaug.pipeline calls
