"""Fidelity metrics (FID, IS, KID, precision/recall) of a synthetic set against a real one, offline.

Every number comes from torch-fidelity's own metric functions; synthaug supplies the
images, the feature extractor and a content-keyed statistics cache.

Extractors (``EvaluateConfig.extractor``): see :mod:`synthaug.evaluate.extractors`.
Features are extracted in a Ray Data actor pool (:mod:`synthaug.evaluate.features`):

- FID uses *every* image: per-block float64 sums of features and outer products are
  merged in the driver into the mean and covariance, then torch-fidelity's
  ``fid_statistics_to_metric`` gives the distance (exact for any N and block count).
- IS, KID and precision/recall use a capped, class-balanced, seeded subset of each set,
  at most ``EvaluateConfig.max_samples`` images (default 50,000, as in FID@50K); the
  subset's features are the only per-image data gathered into one process.

Small sets: a KID subset size above a subset's size is lowered to it (with a warning,
the value used is in ``kid_subset_size``); FID from fewer than ``FID_SAMPLES_PER_DIM`` x
the feature dimension samples is computed but flagged (``fid_small_sample_warning``);
sets under ``MIN_SAMPLES`` images are refused; per-class FID needs ``PER_CLASS_MIN_COUNT``.

Why not ``torch_fidelity.calculate_metrics``: it has no input for precomputed features
or merged statistics, it holds every feature in one process, and its cache is keyed by
a name, not by the images or the extractor weights. So the statistics are computed here
and handed to the same ``*_to_metric`` functions ``calculate_metrics`` calls.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_featuresdict_to_metric

from synthaug.artifacts import DatasetError, read_manifest
from synthaug.config import EvaluateConfig
from synthaug.evaluate.extractors import (  # noqa: F401  (re-exported: fidelity's public names)
    IN_DOMAIN, INCEPTION, INCEPTION_WEIGHTS_SHA256, INCEPTION_WEIGHTS_URL, METRIC_LAYERS, TF_NAMES, ContractImages,
    Extractor, ExtractorError, InDomainFeatureExtractor, _device, build_extractor, extract_batch, resolve_extractor,
    verify_inception_weights,
)
from synthaug.evaluate.features import (  # noqa: F401  (re-exported)
    EXTRACTED_ROWS, DatasetStatistics, cache_key, dataset_statistics, mean_cov, subset_quotas,
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


# ----------------------------------------------------------------------------- metrics


def fidelity_from_features(
    synth: dict[str, np.ndarray],
    real: dict[str, np.ndarray],
    layers: dict[str, str],
    kid_subset_size: int,
    *,
    fid_stats: tuple[dict, dict, int, int] | None = None,
    isc_splits: int = ISC_SPLITS,
    kid_subsets: int = KID_SUBSETS,
    rng_seed: int = 2020,
) -> dict:
    """torch-fidelity's IS (of ``synth``), FID, KID and precision/recall from features.

    ``synth`` is torch-fidelity's input1 (generated) and ``real`` its input2, the
    convention its precision/recall assumes. ``layers`` maps metric -> feature name.
    ``fid_stats`` = (synthetic stats, real stats, n synthetic, n real) from merged sums
    replaces FID from the given features (which are then the capped subsets). A KID
    subset size above either set's size is lowered to the smaller set (with a warning),
    as is the number of IS splits; the values used are returned.
    """
    f1 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in synth.items()}
    f2 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in real.items()}
    s1, s2 = len(f1[layers["kid"]]), len(f2[layers["kid"]])
    n1, n2 = (fid_stats[2], fid_stats[3]) if fid_stats else (s1, s2)
    if min(n1, n2, s1, s2) < MIN_SAMPLES:
        raise DatasetError(
            f"fidelity metrics need at least {MIN_SAMPLES} images per set (precision/recall's "
            f"{PRC_NEIGHBORHOOD}-NN radius); got {n1} synthetic and {n2} real"
        )
    subset = min(kid_subset_size, s1, s2)
    if subset < kid_subset_size:
        warnings.warn(f"KID subset size lowered from {kid_subset_size} to {subset}, the size of the smaller set")
    if fid_stats:
        stats1, stats2 = fid_stats[0], fid_stats[1]
    else:
        stats1 = fid_features_to_statistics(f1[layers["fid"]].to(torch.float64))
        stats2 = fid_features_to_statistics(f2[layers["fid"]].to(torch.float64))
    dim = int(stats1["mu"].shape[0])
    small = min(n1, n2) < FID_SAMPLES_PER_DIM * dim
    if small:
        warnings.warn(
            f"FID from {min(n1, n2)} samples with {dim}-dim features (< {FID_SAMPLES_PER_DIM} x dim) is biased "
            "upwards and unstable; compare only FIDs of equal sample counts"
        )
    kw = dict(
        isc_splits=min(isc_splits, s1), kid_subsets=kid_subsets, kid_subset_size=subset,
        prc_neighborhood=PRC_NEIGHBORHOOD, rng_seed=rng_seed, verbose=False,
    )

    # The same torch-fidelity calls calculate_metrics makes, one extractor layer each.
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
        "n_real": int(n2),
        "n_synthetic": int(n1),
        "n_subset_real": int(s2),
        "n_subset_synthetic": int(s1),
        "feature_dim": dim,
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
        "isc_splits": kw["isc_splits"],
        "fid_small_sample_warning": bool(small),
    }


def fid_from_statistics(a: DatasetStatistics, b: DatasetStatistics, group: int | None = None) -> float:
    """torch-fidelity's FID between the merged statistics of two sets (all rows, or one class)."""
    return float(fid_statistics_to_metric(a.fid_stats(group), b.fid_stats(group), False)[KEY_METRIC_FID])


def _check_pair(real_dir, synth_dir, ex: Extractor) -> tuple[dict, dict]:
    """Manifests of both sets, checked against each other and the extractor before any work."""
    mr, ms = read_manifest(real_dir), read_manifest(synth_dir)
    for path, m in ((real_dir, mr), (synth_dir, ms)):
        if m["num_rows"] == 0:
            raise DatasetError(f"{path}: empty dataset (0 rows); nothing to measure")
        if m["num_rows"] < MIN_SAMPLES:
            raise DatasetError(
                f"{path}: {m['num_rows']} images; fidelity metrics need at least {MIN_SAMPLES} images per set "
                f"(precision/recall's {PRC_NEIGHBORHOOD}-NN radius)"
            )
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


def statistics(loc, ex: Extractor, cfg: EvaluateConfig, cache_dir=None, device: str | None = None) -> DatasetStatistics:
    """:func:`dataset_statistics` with the evaluate config's batch size, cap, seed and actor pool."""
    return dataset_statistics(
        loc, ex, batch_size=cfg.batch_size, max_samples=cfg.max_samples, seed=cfg.seed, per_class=cfg.per_class_fid,
        cache_dir=cache_dir, min_actors=cfg.min_actors, max_actors=cfg.max_actors,
        num_gpus=cfg.num_gpus_per_actor, device=device,
    )


def _stats_pair(real_dir, synth_dir, extractor_dir, cfg, cache_dir, inception_weights, expected_sha256, device):
    ex = resolve_extractor(cfg.extractor, extractor_dir, inception_weights, expected_sha256)
    mr, ms = _check_pair(real_dir, synth_dir, ex)
    real = statistics(real_dir, ex, cfg, cache_dir, device)
    synth = statistics(synth_dir, ex, cfg, cache_dir, device)
    return ex, mr, ms, real, synth


def compute_fidelity(
    real_dir,
    synth_dir,
    extractor_dir,
    cfg: EvaluateConfig,
    cache_dir=None,
    *,
    inception_weights: str = "",
    expected_sha256: str = "",
    device: str | None = None,
) -> dict:
    """FID, IS, KID and precision/recall of ``synth_dir`` against ``real_dir``: a flat dict.

    Locations may be local or URIs. ``extractor_dir`` is the in-domain classifier
    location (ignored for Inception, which reads ``inception_weights``, verified against
    ``expected_sha256`` or the official checksum). FID uses every image (merged sums);
    IS/KID/PR the capped subsets (``cfg.max_samples``). Statistics are cached under
    ``cache_dir`` by content; ``None`` disables the cache. Keys: fid, isc_mean, isc_std,
    kid_mean, kid_std, precision, recall, f_score, n_real, n_synthetic, n_subset_real,
    n_subset_synthetic, max_samples, feature_dim, kid_subset_size, kid_subsets,
    isc_splits, fid_small_sample_warning, extractor, extractor_hash,
    feature_layer_{fid,isc,kid,prc}, real_content_hash, synthetic_content_hash.
    """
    ex, mr, ms, sr, ss = _stats_pair(real_dir, synth_dir, extractor_dir, cfg, cache_dir, inception_weights,
                                     expected_sha256, device)
    out = fidelity_from_features(ss.subset, sr.subset, ex.layers, cfg.kid_subset_size,
                                 fid_stats=(ss.fid_stats(), sr.fid_stats(), ss.num_rows, sr.num_rows))
    out.update(
        max_samples=int(cfg.max_samples),
        extractor=ex.kind,
        extractor_hash=ex.weights_sha256,
        **{f"feature_layer_{m}": ex.layers[m] for m in ("fid", "isc", "kid", "prc")},
        real_content_hash=mr["content_hash"],
        synthetic_content_hash=ms["content_hash"],
    )
    return out


def compute_per_class_fid(
    real_dir,
    synth_dir,
    extractor_dir,
    cfg: EvaluateConfig,
    cache_dir=None,
    *,
    min_count: int = PER_CLASS_MIN_COUNT,
    inception_weights: str = "",
    expected_sha256: str = "",
    device: str | None = None,
) -> dict[str, dict]:
    """Per-class FID (torch-fidelity's arithmetic) from per-class merged sums: class -> {fid, n_real, n_synthetic}.

    ``fid`` is NaN where either side has fewer than ``min_count`` images of the class.
    Reuses the statistics cache of :func:`compute_fidelity` when given the same ``cache_dir``.
    Needs ``cfg.per_class_fid`` (per-class sums cost classes x D^2 floats in the driver).
    """
    if not cfg.per_class_fid:
        raise ValueError("per-class FID needs evaluate.per_class_fid=true (per-class sums)")
    ex, mr, ms, sr, ss = _stats_pair(real_dir, synth_dir, extractor_dir, cfg, cache_dir, inception_weights,
                                     expected_sha256, device)
    if list(mr["class_names"]) != list(ms["class_names"]):
        raise DatasetError(f"class names differ: real {real_dir} has {mr['class_names']}, synthetic {synth_dir} has {ms['class_names']}")
    out = {}
    for k, name in enumerate(mr["class_names"]):
        nr, ns = int(sr.n[k]), int(ss.n[k])
        fid = fid_from_statistics(ss, sr, k) if min(nr, ns) >= max(min_count, 2) else math.nan
        out[name] = {"fid": fid, "n_real": nr, "n_synthetic": ns}
    return out


def make_feature_fn(extractor_dir, batch_size: int = 64, layer: str = "pre_logits", device: str | None = None):
    """``uint8 (B, C, H, W) array -> float32 (B, D)`` through the in-domain extractor, in this process."""
    ex = resolve_extractor("in-domain", extractor_dir)
    dev = _device(device)
    fe = build_extractor(ex, [layer], dev)

    def feature_fn(images_u8: np.ndarray) -> np.ndarray:
        if len(images_u8) == 0:
            return np.zeros((0, 0), np.float32)
        parts = [extract_batch(fe, images_u8[i:i + batch_size], dev)[layer] for i in range(0, len(images_u8), batch_size)]
        return np.concatenate(parts)

    return feature_fn


feature_fn = make_feature_fn
