"""Evaluate stage: fidelity metrics against independent references, invariances, merged
statistics, the capped subset, the offline Inception path, the content-keyed cache, bad
input, the near-copy audit, reports.

Everything runs on CPU with no network, through a real local Ray (the feature actor
pool): a tiny in-domain classifier is trained here in a few seconds, and the Inception
test uses randomly initialised weights from a temp file.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.linalg
import torch

from synthaug.artifacts import DatasetError, read_manifest, read_table, sha256_file, write_dataset
from synthaug.classify.models import create_classifier, save_classifier
from synthaug.config import EvaluateConfig
from synthaug.data.images import decode_batch, encode_png, to_float
from synthaug.evaluate import features as feat
from synthaug.evaluate import fidelity as fd
from synthaug.evaluate import memorization as mem
from synthaug.evaluate import report

CLASSES = [str(i) for i in range(10)]

# Digits sets are far below 10 x the 128 feature dimensions, so every FID here warns; the
# flag is checked where it matters, the warning would only be noise elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:FID from .* samples:UserWarning")


# ----------------------------------------------------------------------------- helpers


def load_images(path):
    """uint8 (N, C, H, W) images and labels of a contract dataset."""
    t = read_table(path, columns=["image", "label"])
    return decode_batch(t.column("image").to_pylist()), np.asarray(t.column("label").to_pylist())


def write_set(path, images, labels, prefix="img", class_names=CLASSES, size=None):
    """Write uint8 (N, C, H, W) images (or a list of them, sizes may differ) as a contract dataset."""
    ids = [f"{prefix}-{i:05d}" for i in range(len(images))]
    pngs = [encode_png(np.asarray(im).transpose(1, 2, 0)) for im in images]
    labels = [int(x) for x in labels]
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "image": pa.array(pngs, pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "class_name": pa.array([class_names[x] for x in labels], pa.string()),
            "source": pa.array(["synthetic"] * len(ids), pa.string()),
        }
    )
    c, h, w = images[0].shape if len(images) else (1, 8, 8)
    write_dataset(table, path, class_names=class_names, image_size=size or (h, w), channels=c, config={})
    return path


def noisy(images, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float64) + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def frechet(x, y):
    """Independent Fréchet distance (float64, scipy sqrtm) between two feature sets."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def clf_dir(digits_dirs, tmp_path_factory, ray_session):
    """A synthaug_cnn_tiny trained for a few epochs on the digits train_full split (and a local Ray:
    every test that extracts features through the actor pool uses this fixture)."""
    torch.manual_seed(0)
    x, y = load_images(digits_dirs["train_full"])
    x, y = torch.from_numpy(to_float(x)), torch.from_numpy(y)
    model = create_classifier("synthaug_cnn_tiny", num_classes=10, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    meta = {"model": "synthaug_cnn_tiny", "num_classes": 10, "in_chans": 1, "image_size": [8, 8], "class_names": CLASSES}
    return save_classifier(model.eval(), tmp_path_factory.mktemp("clf") / "extractor", meta)


@pytest.fixture(scope="module")
def synth_dir(digits_dirs, tmp_path_factory):
    """A stand-in synthetic set: the real train_full images with pixel noise."""
    x, y = load_images(digits_dirs["train_full"])
    return write_set(tmp_path_factory.mktemp("syn") / "synth", noisy(x, 20.0), y, prefix="syn")


def calls():
    """Rows run through an extractor by this process's pipelines (0 new rows = served from the cache)."""
    return sum(fd.EXTRACTED_ROWS.values())


def full_features(path, clf_dir):
    """Every image's features, through the Ray-free compute core (the independent reference)."""
    ex = fd.resolve_extractor("in-domain", clf_dir)
    fe = fd.build_extractor(ex, ["pre_logits", "logits"], "cpu")
    x, y = load_images(path)
    parts = [fd.extract_batch(fe, np.repeat(x[i:i + 100], 3, axis=1)) for i in range(0, len(x), 100)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("pre_logits", "logits")}, y


# ----------------------------------------------------------------------------- correctness


def test_fid_matches_direct_frechet(digits_dirs, synth_dir, clf_dir):
    ex = fd.resolve_extractor("in-domain", clf_dir)
    fr, _ = full_features(digits_dirs["val"], clf_dir)
    fs, _ = full_features(synth_dir, clf_dir)
    ours = fd.fidelity_from_features(fs, fr, ex.layers, 100)["fid"]
    ref = frechet(fs["pre_logits"], fr["pre_logits"])
    assert ref > 0
    assert ours == pytest.approx(ref, rel=1e-4)
    # The end-to-end path gives the same number from the same features.
    with pytest.warns(UserWarning, match=r"FID from \d+ samples with 128-dim features"):  # the val split (~580) < 10 x 128
        out = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, EvaluateConfig())
    assert out["fid"] == pytest.approx(ours, rel=1e-5)
    keys = {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "f_score", "n_real",
            "n_synthetic", "extractor", "extractor_hash", "kid_subset_size", "fid_small_sample_warning"}
    assert keys <= set(out)
    assert out["extractor"] == "in-domain" and out["extractor_hash"] == sha256_file(clf_dir / "model.safetensors")
    assert out["feature_layer_fid"] == "pre_logits" and out["feature_layer_isc"] == "logits"
    assert out["n_real"] == read_manifest(digits_dirs["val"])["num_rows"]
    assert out["fid_small_sample_warning"] is True
    big = {"pre_logits": np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32), "logits": np.zeros((100, 3), np.float32)}
    assert fd.fidelity_from_features(big, big, ex.layers, 50)["fid_small_sample_warning"] is False  # 100 >= 10 x 4
    assert 0.0 <= out["precision"] <= 1.0 and 0.0 <= out["recall"] <= 1.0
    assert 1.0 <= out["isc_mean"] <= 10.0


def test_same_numbers_as_torch_fidelity_calculate_metrics(digits_dirs, synth_dir, clf_dir):
    """The registered extractor inside torch-fidelity's own entry point gives our numbers."""
    import torch_fidelity

    ours = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, EvaluateConfig())
    theirs = torch_fidelity.calculate_metrics(
        input1=fd.ContractImages(synth_dir), input2=fd.ContractImages(digits_dirs["val"]),
        feature_extractor=fd.IN_DOMAIN, feature_extractor_weights_path=str(clf_dir),
        isc=True, fid=True, kid=True, prc=True, kid_subset_size=100,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    pairs = {"fid": "frechet_inception_distance", "isc_mean": "inception_score_mean", "isc_std": "inception_score_std",
             "kid_mean": "kernel_inception_distance_mean", "kid_std": "kernel_inception_distance_std",
             "precision": "precision", "recall": "recall", "f_score": "f_score"}
    for ours_key, key in pairs.items():
        assert ours[ours_key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-8), ours_key


def test_isc_of_confident_uniform_logits_is_k():
    k, n = 10, 400
    logits = (60.0 * np.eye(k, dtype=np.float32))[np.arange(n) % k]  # (N, K) one confident class each
    feats = {"pre_logits": np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), "logits": logits}
    layers = fd.METRIC_LAYERS["in-domain"]
    out = fd.fidelity_from_features(feats, feats, layers, 50, isc_splits=1)
    assert out["isc_mean"] == pytest.approx(k, abs=1e-3)
    flat = dict(feats, logits=np.zeros_like(logits))  # no confidence at all -> IS 1
    assert fd.fidelity_from_features(flat, feats, layers, 50, isc_splits=1)["isc_mean"] == pytest.approx(1.0, abs=1e-6)


def test_kid_of_a_set_against_itself_is_zero(digits_dirs, clf_dir):
    ex = fd.resolve_extractor("in-domain", clf_dir)
    f, labels = full_features(digits_dirs["val"], clf_dir)
    part = lambda sel: {k: v[sel] for k, v in f.items()}  # noqa: E731
    # The yardstick: two clearly different distributions (digits 0-4 against 5-9).
    apart = fd.fidelity_from_features(part(labels < 5), part(labels >= 5), ex.layers, 100)
    assert apart["kid_mean"] > 1.0
    # The set against itself. torch-fidelity draws the two subsets independently from the
    # same pool, so they share ~m^2/n points and the estimate sits O(1/n) below 0.
    same = fd.fidelity_from_features(f, f, ex.layers, 100)
    assert abs(same["kid_mean"]) < 0.02 * apart["kid_mean"]
    assert abs(same["fid"]) < 1e-6 * apart["fid"]
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    # Two disjoint halves of one set: same distribution, independent samples.
    perm = np.random.default_rng(0).permutation(len(labels))
    halves = fd.fidelity_from_features(part(perm[::2]), part(perm[1::2]), ex.layers, 100)
    assert abs(halves["kid_mean"]) < 0.03 * apart["kid_mean"]


# ----------------------------------------------------------------------------- invariance


def test_metrics_do_not_depend_on_batch_size(digits_dirs, synth_dir, clf_dir, monkeypatch):
    """Nor on the pool's form: batches of 7 in an actor pool, of 64 in pooled tasks (a set this small)."""
    from synthaug import raylocal

    with monkeypatch.context() as m:
        m.setattr(raylocal, "SMALL_MAP_ROWS", 0)
        a = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, EvaluateConfig(batch_size=7))
    b = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, EvaluateConfig(batch_size=64))
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, float):
            assert v == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
        else:
            assert v == b[k], k


def test_per_class_fid(digits_dirs, synth_dir, clf_dir):
    cfg = EvaluateConfig()
    per = fd.compute_per_class_fid(digits_dirs["val"], synth_dir, clf_dir, cfg)
    assert list(per) == CLASSES
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in per.values())
    # The reference: torch-fidelity-independent Fréchet distance on the class's features.
    (fr, lr), (fs, ls) = full_features(digits_dirs["val"], clf_dir), full_features(synth_dir, clf_dir)
    ref = frechet(fs["pre_logits"][ls == 3], fr["pre_logits"][lr == 3])
    assert per["3"]["fid"] == pytest.approx(ref, rel=1e-4)
    # Ten train images per class is below the documented minimum: NaN, counts still reported.
    small = fd.compute_per_class_fid(digits_dirs["val"], digits_dirs["train"], clf_dir, cfg)
    assert all(math.isnan(r["fid"]) and r["n_synthetic"] == 10 for r in small.values())
    assert all(math.isfinite(r["fid"]) for r in fd.compute_per_class_fid(digits_dirs["val"], digits_dirs["train"], clf_dir, cfg, min_count=5).values())


# ----------------------------------------------------------------------------- merged statistics, capped subset


def test_block_sums_merge_exactly_for_any_split():
    """Ray-free: mean/covariance from merged per-block sums equal the direct ones for any blocking."""
    rng = np.random.default_rng(0)
    f = (rng.normal(size=(503, 6)) * 3 + 5).astype(np.float32)  # (N, D), an offset mean
    labels = rng.integers(0, 3, len(f))
    ids = np.array([f"r{i}" for i in range(len(f))], dtype=object)
    direct = fd.fid_features_to_statistics(torch.from_numpy(f.astype(np.float64)))
    results = []
    for cuts in ([503], [1, 3, 503], list(range(7, 503, 7)) + [503]):
        m = feat._Merger(3, ["x"])
        lo = 0
        for hi in cuts:
            blk = {"feat_x": f[lo:hi], "label": labels[lo:hi], "id": ids[lo:hi], "selected": np.ones(hi - lo, bool)}
            m.add({k: v[0] for k, v in feat.block_sums(blk, "x", ["x"], per_class=True).items() if k != "rows"})
            lo = hi
        st = m.result()
        assert st.num_rows == 503 and list(st.n) == [int((labels == k).sum()) for k in range(3)]
        got = st.fid_stats()
        assert np.allclose(got["mu"], direct["mu"], rtol=1e-12, atol=1e-12)
        assert np.allclose(got["sigma"], direct["sigma"], rtol=1e-9, atol=1e-9)
        one = st.fid_stats(1)
        assert np.allclose(one["sigma"], np.cov(f[labels == 1].astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9)
        assert list(st.subset_ids) == sorted(ids)  # canonical order, whatever the blocks
        results.append(fd.fid_from_statistics(st, st, 1))
    other = feat.mean_cov(503, f.astype(np.float64).sum(0) + 1.0, f.astype(np.float64).T @ f.astype(np.float64))
    assert fd.fid_statistics_to_metric(other, direct, False)["frechet_inception_distance"] > 0


def test_merged_statistics_match_direct_and_ignore_batch_and_block_size(digits_dirs, clf_dir, monkeypatch):
    ref, labels = full_features(digits_dirs["val"], clf_dir)
    direct = fd.fid_features_to_statistics(torch.from_numpy(ref["pre_logits"].astype(np.float64)))
    a = fd.dataset_statistics(digits_dirs["val"], str(clf_dir), batch_size=64)
    monkeypatch.setattr(feat, "SUM_ROWS", 13)  # many blocks, none aligned with the batches
    b = fd.dataset_statistics(digits_dirs["val"], str(clf_dir), batch_size=7)
    for st in (a, b):
        assert st.num_rows == len(labels) and list(st.n) == list(np.bincount(labels, minlength=10))
        s = st.fid_stats()
        assert np.allclose(s["mu"], direct["mu"], rtol=1e-5, atol=1e-6)
        assert np.allclose(s["sigma"], direct["sigma"], rtol=1e-4, atol=1e-6)
    assert fd.fid_from_statistics(a, b) == pytest.approx(0.0, abs=1e-6)
    assert np.array_equal(a.subset_ids, b.subset_ids)
    assert np.allclose(a.subset["pre_logits"], b.subset["pre_logits"], atol=1e-5)


def test_capped_subset_is_class_balanced_seeded_and_fid_uses_every_image(digits_dirs, synth_dir, clf_dir):
    assert fd.subset_quotas([10, 3, 10], 15) == [6, 3, 6]
    assert fd.subset_quotas([10, 3, 10], 100) == [10, 3, 10]
    assert sum(fd.subset_quotas([7, 0, 9, 2], 10)) == 10
    cfg = EvaluateConfig(max_samples=50)
    full = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, EvaluateConfig())
    with pytest.warns(UserWarning, match="KID subset size lowered from 100 to 50"):
        capped = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, cfg)
    assert capped["fid"] == pytest.approx(full["fid"], rel=1e-9)  # FID: every image, through merged sums
    assert capped["n_real"] == full["n_real"] and capped["n_subset_real"] == 50 == capped["n_subset_synthetic"]
    assert capped["max_samples"] == 50 and capped["kid_subset_size"] == 50

    # The subset: per class, the 5 rows with the smallest key of (seed, id) -- a pure function of the rows.
    st = fd.dataset_statistics(digits_dirs["val"], str(clf_dir), max_samples=50, seed=3)
    t = read_table(digits_dirs["val"], columns=["id", "label"])
    ids, lab = np.asarray(t.column("id").to_pylist(), dtype=object), np.asarray(t.column("label"))
    keys = feat.subset_keys(ids, 3)
    chosen = {i for k in range(10) for i in ids[lab == k][np.argsort(keys[lab == k])[:5]]}
    want = [i for i in ids if i in chosen]  # in the dataset's own (manifest) order
    assert list(st.subset_ids) == want and list(np.bincount(st.subset_labels)) == [5] * 10
    other = fd.dataset_statistics(digits_dirs["val"], str(clf_dir), max_samples=50, seed=4)
    assert set(other.subset_ids) != chosen


# ----------------------------------------------------------------------------- offline Inception


@pytest.fixture()
def no_network(monkeypatch):
    """Any socket connection or torch.hub download fails the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(inc, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def random_inception_weights(path):
    """A randomly initialised state dict with torch-fidelity's InceptionV3 shapes."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Shapes(FeatureExtractorInceptionV3):
        def load_state_dict(self, *a, **k):  # skip loading: we only want the architecture
            return None

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(Shapes("shapes", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), path)
    return path


def test_inception_path_runs_offline_from_a_verified_file(tmp_path, no_network, ray_session):
    weights = random_inception_weights(tmp_path / "inception.pth")
    digest = sha256_file(weights)
    rng = np.random.default_rng(0)
    real = write_set(tmp_path / "real", rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8), np.arange(5) % 3, class_names=CLASSES[:3])
    syn = write_set(tmp_path / "syn", rng.integers(0, 256, (4, 3, 10, 10), dtype=np.uint8), np.arange(4) % 3, class_names=CLASSES[:3])
    cfg = EvaluateConfig(extractor="inception-v3-compat", batch_size=4)
    with pytest.warns(UserWarning, match="KID subset size lowered from 100 to 4"):
        out = fd.compute_fidelity(real, syn, None, cfg, tmp_path / "cache", inception_weights=str(weights), expected_sha256=digest)
    assert out["extractor"] == "inception-v3-compat" and out["extractor_hash"] == digest
    assert out["feature_dim"] == 2048 and out["feature_layer_isc"] == "logits_unbiased"
    assert out["kid_subset_size"] == 4 and (out["n_real"], out["n_synthetic"]) == (5, 4)
    assert math.isfinite(out["fid"]) and math.isfinite(out["isc_mean"])

    # A missing file or a checksum mismatch is an error naming the path and where to get the weights.
    missing = tmp_path / "nope.pth"
    with pytest.raises(fd.ExtractorError, match="nope.pth") as e:
        fd.compute_fidelity(real, syn, None, cfg, inception_weights=str(missing))
    assert fd.INCEPTION_WEIGHTS_URL in str(e.value)
    with pytest.raises(fd.ExtractorError, match="inception.pth") as e:  # official checksum != random file
        fd.compute_fidelity(real, syn, None, cfg, inception_weights=str(weights))
    assert fd.INCEPTION_WEIGHTS_URL in str(e.value) and fd.INCEPTION_WEIGHTS_SHA256 in str(e.value)
    with pytest.raises(fd.ExtractorError, match="never downloads"):
        fd.compute_fidelity(real, syn, None, cfg)


# ----------------------------------------------------------------------------- cache


def test_feature_cache_is_keyed_by_content_and_weights(digits_dirs, synth_dir, clf_dir, tmp_path):
    cache = tmp_path / "cache"
    cfg = EvaluateConfig(batch_size=64)
    n0 = calls()
    first = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, cfg, cache)
    assert calls() > n0 and len(list(cache.glob("*.npz"))) == 2

    # Nothing changed: features come from the cache, the extractor never runs.
    n1 = calls()
    again = fd.compute_fidelity(digits_dirs["val"], synth_dir, clf_dir, cfg, cache)
    assert calls() == n1 and again == first

    # One real image changed: that set's content hash changes, so its features are recomputed.
    x, y = load_images(digits_dirs["val"])
    x[0, 0, 3, 3] ^= 0xFF
    changed = write_set(tmp_path / "val_changed", x, y, prefix="val")
    assert read_manifest(changed)["content_hash"] != read_manifest(digits_dirs["val"])["content_hash"]
    n2 = calls()
    out = fd.compute_fidelity(changed, synth_dir, clf_dir, cfg, cache)
    assert calls() - n2 == len(x)  # the real set only; the synthetic one is reused
    assert out["fid"] != first["fid"] and len(list(cache.glob("*.npz"))) == 3

    # Same images, other extractor weights: recomputed too (the key holds the weights' sha256).
    from synthaug.classify.models import load_classifier

    model, meta = load_classifier(clf_dir)
    with torch.no_grad():
        model.head.bias.add_(0.5)
    other = save_classifier(model, tmp_path / "other_clf", meta)
    n3 = calls()
    fd.compute_fidelity(digits_dirs["val"], synth_dir, other, cfg, cache)
    assert calls() > n3


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(digits_dirs, synth_dir, clf_dir, tmp_path):
    cfg = EvaluateConfig()
    x, y = load_images(digits_dirs["val"])

    # An empty dataset.
    empty = write_set(tmp_path / "empty", np.zeros((0, 1, 8, 8), np.uint8), [], size=(8, 8))
    with pytest.raises(DatasetError, match="empty"):
        fd.compute_fidelity(digits_dirs["val"], empty, clf_dir, cfg)

    # Fewer images than the KID subset size: the subset is lowered, with a warning, and recorded.
    few = write_set(tmp_path / "few", x[:30], y[:30])
    with pytest.warns(UserWarning, match="KID subset size lowered from 100 to 30"):
        out = fd.compute_fidelity(digits_dirs["val"], few, clf_dir, cfg)
    assert out["kid_subset_size"] == 30 and out["n_synthetic"] == 30
    # Fewer than precision/recall's neighbourhood needs: refused.
    tiny = write_set(tmp_path / "tiny", x[:3], y[:3])
    with pytest.raises(DatasetError, match="at least 4 images"):
        fd.compute_fidelity(digits_dirs["val"], tiny, clf_dir, cfg)

    # Image sizes: the in-domain extractor does not resize, so sets must match (checked before extraction).
    big = write_set(tmp_path / "big", np.zeros((8, 1, 10, 10), np.uint8), np.arange(8))
    n = calls()
    with pytest.raises(DatasetError, match="sizes differ"):
        fd.compute_fidelity(digits_dirs["val"], big, clf_dir, cfg)
    assert calls() == n
    # ... and within a set, an image that breaks the manifest's size is named.
    odd = write_set(tmp_path / "odd", [*x[:5], np.zeros((1, 9, 9), np.uint8)], y[:6], size=(8, 8))
    with pytest.raises(DatasetError, match="img-00005"):
        fd.compute_fidelity(digits_dirs["val"], odd, clf_dir, cfg)

    # A directory without a manifest is incomplete and not read.
    incomplete = tmp_path / "incomplete"
    (incomplete / "data").mkdir(parents=True)
    (read_table(few)).to_pandas().to_parquet(incomplete / "data" / "part-0.parquet")
    with pytest.raises(DatasetError, match="manifest"):
        fd.compute_fidelity(digits_dirs["val"], incomplete, clf_dir, cfg)

    # No usable extractor.
    with pytest.raises(fd.ExtractorError, match="classifier"):
        fd.compute_fidelity(digits_dirs["val"], few, tmp_path / "no_clf", cfg)
    # An unknown extractor is refused when the config section is built (typed choices).
    from synthaug.config import ConfigError

    with pytest.raises(ConfigError, match="evaluate.extractor.*unknown extractor 'clip'"):
        fd.compute_fidelity(digits_dirs["val"], few, clf_dir, EvaluateConfig(extractor="clip"))


# ----------------------------------------------------------------------------- memorisation


def test_near_copy_audit_finds_planted_copies(digits_dirs, clf_dir, tmp_path):
    x, y = load_images(digits_dirs["train_full"])
    # 20 exact copies of train images among 200 noisy ones.
    syn_x = np.concatenate([x[:20], noisy(x[100:300], 40.0, seed=1)])
    syn_y = np.concatenate([y[:20], y[100:300]])
    syn = write_set(tmp_path / "syn", syn_x, syn_y, prefix="syn")
    audit = mem.near_copy_audit(digits_dirs["train_full"], digits_dirs["val"], syn, clf_dir, percentile=5.0, top_k=24,
                                chunk=64, cache_dir=tmp_path / "stores")
    assert audit["n_synthetic"] == 220 and audit["n_train"] == len(x) and audit["percentile"] == 5.0
    assert audit["near_copy_threshold"] > 0
    assert 20 / 220 <= audit["near_copy_share"] < 0.5
    assert 20 / 220 <= audit["pixel_near_copy_share"] < 0.5
    assert set(audit["per_class"]) == set(CLASSES)
    assert sum(r["n_synthetic"] for r in audit["per_class"].values()) == 220
    assert len(audit["pairs"]) == 24
    top = audit["pairs"][:20]  # closest first: exactly the planted copies, at distance 0
    assert all(p.distance == 0.0 and p.pixel_distance == 0.0 for p in top)
    assert {p.synthetic_id for p in top} == {f"syn-{i:05d}" for i in range(20)}
    assert all(np.array_equal(p.synthetic_image, p.train_image) and p.synthetic_label == p.train_label for p in top)
    assert audit["pairs"][20].distance > 0
    json.dumps([p.as_row() for p in audit["pairs"]])  # the pairs' metadata is JSON-able
    png = Path(mem.save_pairs_grid(audit["pairs"], tmp_path / "pairs.png"))
    assert png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"

    # The chunked search is exact: a chunk size that splits every set gives the same audit as
    # one chunk, and the stores are reused (no extraction on the second call).
    n = calls()
    whole = mem.near_copy_audit(digits_dirs["train_full"], digits_dirs["val"], syn, clf_dir, percentile=5.0, top_k=24,
                                chunk=100_000, cache_dir=tmp_path / "stores")
    assert calls() == n
    for key in ("near_copy_share", "near_copy_threshold", "pixel_near_copy_share", "pixel_threshold"):
        assert whole[key] == pytest.approx(audit[key], rel=1e-5), key
    assert [p.synthetic_id for p in whole["pairs"][:20]] == [p.synthetic_id for p in top]


def test_nearest_chunked_matches_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=(101, 5)).astype(np.float32)
    r[7] = q[3]  # an exact copy: distance exactly 0
    d_ref = np.sqrt(((q[:, None, :].astype(np.float64) - r[None]) ** 2).sum(-1))  # (37, 101)
    for chunk in (1, 10, 1000):
        d, idx = mem.nearest(q, r, chunk=chunk)
        assert np.array_equal(idx, d_ref.argmin(1)), chunk
        assert np.allclose(d, d_ref.min(1), rtol=1e-5), chunk
        assert d[3] == 0.0 and idx[3] == 7


def test_near_copy_audit_bad_input(digits_dirs, clf_dir, tmp_path):
    fn = clf_dir
    big = write_set(tmp_path / "big", np.zeros((8, 1, 10, 10), np.uint8), np.arange(8))
    with pytest.raises(DatasetError, match="pixel-space audit needs one image shape"):
        mem.near_copy_audit(digits_dirs["train"], digits_dirs["val"], big, fn)
    empty = write_set(tmp_path / "empty", np.zeros((0, 1, 8, 8), np.uint8), [], size=(8, 8))
    with pytest.raises(DatasetError, match="empty"):
        mem.near_copy_audit(digits_dirs["train"], digits_dirs["val"], empty, fn)
    with pytest.raises(ValueError, match="no pairs"):
        mem.save_pairs_grid([], tmp_path / "x.png")


# ----------------------------------------------------------------------------- reports


def test_reports(tmp_path):
    metrics = {"fid": 12.5, "isc_mean": 3.0, "n_real": 10, "extractor": "in-domain", "per_class_min": float("nan"), "flag": True}
    js, md = (Path(p) for p in report.write_metrics(tmp_path, metrics))
    back = json.loads(js.read_text())
    assert back == {**metrics, "per_class_min": None}  # NaN is written as null
    assert "| `fid` | 12.5 |" in md.read_text() and "n/a" in md.read_text()
    with pytest.raises(ValueError, match="per_class"):
        report.write_metrics(tmp_path, {"per_class": {"0": 1.0}})

    per = {"0": {"fid": 1.25, "n_real": 50}, "1": {"fid": float("nan"), "n_real": 3}}
    table = report.per_class_markdown(per)
    assert table.splitlines()[0] == "| class | fid | n_real |" and "| 1 | n/a | 3 |" in table
    pj, _ = report.write_per_class(tmp_path, per)
    assert json.loads(Path(pj).read_text())["1"]["fid"] is None

    rows = [{"guidance_scale": w, "fid": 30 / (1 + w), "isc_mean": 2 + w, "isc_std": 0.1, "cas": 0.8 - 0.01 * w} for w in (1.0, 2.0, 4.0)]
    png = Path(report.plot_vs_guidance(rows + [{"guidance_scale": 8.0, "fid": 5.0}], tmp_path / "fig3.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="guidance_scale"):
        report.plot_vs_guidance([{"fid": 1.0}], tmp_path / "bad.png")


def test_sample_grid_reads_a_bounded_subset(digits_dirs, synth_dir, tmp_path):
    from PIL import Image

    from synthaug.report import first_per_class, sample_grid

    got = first_per_class(digits_dirs["train"], 3)
    assert sorted(got) == list(range(10)) and all(x.shape == (3, 3, 8, 8) for x in got.values())
    png = Path(sample_grid(digits_dirs["train"], {1.0: synth_dir, 3.0: synth_dir}, tmp_path / "g" / "grid.png", per_class=3, scale=2))
    img = Image.open(png)
    # Three blocks of 3 tiles (8 px + 1 px padding) side by side, 10 class rows, scaled 2x, plus the label margins.
    assert img.size == (24 + 2 * (3 * (3 * 9 + 1) + 2 * 4), 16 + 2 * (10 * 9 + 1))


def test_torch_threads_are_the_cpus_ray_gives(ray_session):
    """``raylocal.use_assigned_cpus`` (a feature actor calls it): torch's pool is the task's or actor's CPUs,
    even in a worker process an earlier task of another size started torch in."""
    import ray

    from synthaug.raylocal import use_assigned_cpus

    def threads():
        import torch

        return use_assigned_cpus(), torch.get_num_threads()

    task = ray.remote(threads)
    assert ray.get(task.options(num_cpus=1).remote()) == (1, 1)
    assert ray.get(task.options(num_cpus=2).remote()) == (2, 2)
    assert ray.get(task.options(num_cpus=0.5).remote()) == (1, 1)
