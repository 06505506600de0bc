"""Mixing arithmetic, the PyTorch core against plain references, and Ray Train end to end."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pytest
import torch

from synthaug.artifacts import BASE_COLUMNS, read_manifest, read_table
from synthaug.classify.mixing import mix
from synthaug.classify.train import evaluate, fit, fit_local, shift_augment
from synthaug.config import ClassifyConfig

REAL_COUNTS = {"a": 4, "b": 2, "c": 3}


def _table(counts: dict[str, int], source: str, prefix: str, provenance: bool = False) -> pa.Table:
    names = list(REAL_COUNTS)
    rows = [(f"{prefix}-{name}-{i}", names.index(name), name) for name, n in counts.items() for i in range(n)]
    cols = {
        "id": [r[0] for r in rows],
        "image": pa.array([r[0].encode() for r in rows], pa.binary()),  # opaque bytes: mix never decodes
        "label": pa.array([r[1] for r in rows], pa.int64()),
        "class_name": [r[2] for r in rows],
        "source": [source] * len(rows),
    }
    if provenance:
        cols.update(generator=["g"] * len(rows), seed=list(range(len(rows))), guidance_scale=[2.0] * len(rows))
    return pa.table(cols)


def _counts(table: pa.Table) -> collections.Counter:
    return collections.Counter(zip(table.column("class_name").to_pylist(), table.column("source").to_pylist()))


@pytest.fixture()
def real_syn():
    return _table(REAL_COUNTS, "real", "r"), _table({k: 20 for k in REAL_COUNTS}, "synthetic", "s", provenance=True)


@pytest.mark.parametrize("ratio", [0, 1, 3])
def test_mix_counts_per_class_and_source(real_syn, ratio):
    real, syn = real_syn
    out = mix(real, syn, ratio, seed=0)
    assert tuple(out.column_names) == BASE_COLUMNS
    assert out.num_rows == 9 + round(ratio * 9)
    expected = {(k, "real"): n for k, n in REAL_COUNTS.items()}
    expected.update({(k, "synthetic"): ratio * n for k, n in REAL_COUNTS.items() if ratio})
    assert _counts(out) == expected
    assert len(set(out.column("id").to_pylist())) == out.num_rows


def test_mix_synthetic_only_and_fractional(real_syn):
    real, syn = real_syn
    only = mix(real, syn, 1, seed=0, synthetic_only=True)
    assert _counts(only) == {(k, "synthetic"): n for k, n in REAL_COUNTS.items()}
    assert mix(real, syn, 0, seed=0, synthetic_only=True).num_rows == syn.num_rows  # r = 0: all of it
    # r = 0.5: per-class shares 2, 1, 1.5 -> largest remainder to round(4.5) = 4 in total.
    half = mix(real, syn, 0.5, seed=0)
    assert sum(n for (_, s), n in _counts(half).items() if s == "synthetic") == round(0.5 * 9)


def test_mix_is_pure_seeded_and_nested(real_syn):
    real, syn = real_syn
    ids = lambda t: [i for i, s in zip(t.column("id").to_pylist(), t.column("source").to_pylist()) if s == "synthetic"]
    assert mix(real, syn, 1, seed=3).equals(mix(real, syn, 1, seed=3))
    assert ids(mix(real, syn, 1, seed=3)) != ids(mix(real, syn, 1, seed=4))
    # A smaller ratio takes a subset of a larger one's synthetic rows (same seed).
    assert set(ids(mix(real, syn, 1, seed=3))) <= set(ids(mix(real, syn, 3, seed=3)))


def test_mix_bad_input(real_syn):
    real, syn = real_syn
    with pytest.raises(ValueError, match="ratio must be >= 0"):
        mix(real, syn, -0.5, seed=0)
    other = _table({"a": 5, "b": 5}, "synthetic", "s").set_column(3, "class_name", pa.array(["a"] * 5 + ["z"] * 5))
    with pytest.raises(ValueError, match=r"\['a', 'z'\].*\['a', 'b', 'c'\]"):
        mix(real, other, 1, seed=0)
    with pytest.raises(ValueError, match="class 'a'.*needs 40.*has 20"):
        mix(real, syn, 10, seed=0)
    with pytest.raises(ValueError, match="needs a synthetic set"):
        mix(real, None, 1, seed=0)


# ----------------------------------------------------------------------------- PyTorch core


def test_shift_augment_matches_explicit_shifts():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = shift_augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for b in range(2):
        shifted = [padded[b, :, dy : dy + 4, dx : dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[b], s) for s in shifted)


def test_evaluate_against_numpy():
    logits = torch.tensor(np.random.default_rng(0).normal(size=(50, 6)), dtype=torch.float32)
    labels = np.random.default_rng(1).integers(0, 6, 50)

    class Fixed(torch.nn.Module):  # returns row i of `logits` for input value i
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()]

    m = evaluate(Fixed(), torch.arange(50.0).reshape(50, 1, 1, 1), labels, batch_size=7)
    ranks = np.argsort(-logits.numpy(), axis=1)
    assert m["top1"] == pytest.approx(100 * np.mean(ranks[:, 0] == labels))
    assert m["top5"] == pytest.approx(100 * np.mean((ranks[:, :5] == labels[:, None]).any(1)))
    c2 = labels == 2
    assert m["per_class_top1"][2] == pytest.approx(100 * np.mean(ranks[c2, 0] == 2))


# ----------------------------------------------------------------------------- Ray


def _digits(digits_dirs):
    return read_table(digits_dirs["train"]), read_manifest(digits_dirs["train"])["class_names"]


def test_fit_local_is_reproducible(ray_session, digits_dirs):
    train, names = _digits(digits_dirs)
    cfg = ClassifyConfig(epochs=2, batch_size=32)
    kw = dict(seed=5, class_names=names, in_chans=1, reporter="local")
    a, b = fit_local(cfg, train, digits_dirs["val"], **kw), fit_local(cfg, train, digits_dirs["val"], **kw)
    assert a["top1"] == b["top1"] and a["train_loss"] == b["train_loss"]
    assert a["epochs"] == 2 and a["n_train"] == 100


def test_fit_two_workers_learns_and_resumes(ray_session, digits_dirs, tmp_path):
    from synthaug.classify.models import load_classifier
    from synthaug.data.images import decode_batch, to_float

    train, names = _digits(digits_dirs)
    cfg = ClassifyConfig(epochs=2, batch_size=16, num_workers=2)
    kw = dict(seed=0, out_dir=tmp_path, name="X", class_names=names, in_chans=1)
    first = fit(cfg, train, digits_dirs["val"], **kw)
    assert (first["start_epoch"], first["epochs"]) == (0, 2)

    # Same name and storage with more epochs: only epochs 3-4 run.
    second = fit(ClassifyConfig(epochs=4, batch_size=16, num_workers=2), train, digits_dirs["val"], save_model=True, **kw)
    assert (second["start_epoch"], second["epochs"]) == (2, 4)
    assert second["top1"] > 30.0, second  # chance is 10%
    assert second["n_train"] == 100 and len(second["per_class_top1"]) == 10

    # The saved model reproduces the reported accuracy; checkpoint state loads without pickle.
    model, meta = load_classifier(tmp_path / "model")
    assert meta["class_names"] == names and meta["image_size"] == [8, 8]
    val = read_table(digits_dirs["val"])
    x = to_float(decode_batch(val.column("image").to_pylist()))
    assert evaluate(model, x, val.column("label").to_pylist())["top1"] == pytest.approx(second["top1"], abs=1e-4)
    states = sorted((tmp_path / "X").glob("checkpoint_*/state.pt"))
    assert int(torch.load(states[-1], weights_only=True)["epoch"]) == 4


def test_unknown_model_name_suggests_close_names(digits_dirs, tmp_path):
    train, names = _digits(digits_dirs)
    with pytest.raises(ValueError, match="unknown timm model 'synthaug_cnn_tinny'.*synthaug_cnn_tiny"):
        fit(ClassifyConfig(model="synthaug_cnn_tinny"), train, digits_dirs["val"], seed=0, out_dir=tmp_path,
            name="bad", class_names=names, in_chans=1)
