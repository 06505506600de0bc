"""The pseudo-label baseline and confidence filtering, with a real teacher on digits (real Ray).

One teacher (the real-only classifier on the 10-per-class labelled set) is trained once
for the module; pseudo-labels and filters are checked against the same teacher's
probabilities computed here in-process (an independent path: no Ray Data, no actor).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from synthaug import pipeline as P
from synthaug import storage
from synthaug.artifacts import read_manifest, read_table, write_dataset
from synthaug.shuffle import blocked_shards
from synthaug.classify import pseudolabel as PL
from synthaug.classify.mixing import mixture_dataset, plan_mixture
from synthaug.classify.train import _loop_config
from synthaug.cli import main
from synthaug.config import ConfigError, load_config, replace

FAST = ["classify.epochs=30", "classify.eval_every=30", "classify.seeds=[0]", "classify.cache=true"]


@pytest.fixture(scope="module")
def setup(ray_session, digits_dirs, tmp_path_factory):
    work = tmp_path_factory.mktemp("pl")
    cfg = load_config(None, [f"work_dir={work}", "ingest.k_per_class=10", "pseudolabel.threshold=0.6", *FAST])
    d = {k: str(v) for k, v in digits_dirs.items()}
    teacher = P.stage_teacher(cfg, d["train"], d["val"])
    return cfg, d, teacher


def _probs(teacher: dict, table: pa.Table) -> np.ndarray:
    """The teacher's softmax on a bounded table, in this process."""
    actor = PL.TeacherActor(teacher["model"], "pseudo", None, teacher["key"], PL.teacher_classes(teacher), device="cpu")
    return actor.probabilities(table.column("image").to_pylist())


def _truth(d: dict) -> dict:
    t = read_table(d["train_full"], columns=["id", "label"])
    return dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))


def test_pseudolabel_stage_end_to_end(setup):
    cfg, d, teacher = setup
    res = P.stage_pseudolabel(cfg, d["train"], d["val"], d["pool"], teacher=teacher)
    pseudo = read_table(res["dataset"])
    pool = read_table(d["pool"], columns=["id", "image"])
    m = read_manifest(res["dataset"])
    assert m["columns"] == ["id", "image", "label", "class_name", "source", "confidence", "teacher"]
    assert m["pool_rows"] == pool.num_rows == res["pool_rows"]
    assert 0 < res["n_pseudo"] == pseudo.num_rows < pool.num_rows

    # The kept rows are exactly the pool rows whose in-process top probability is >= the threshold.
    p = _probs(teacher, pool)
    want = {i for i, conf in zip(pool.column("id").to_pylist(), p.max(1)) if conf >= 0.6}
    assert set(pseudo.column("id").to_pylist()) == want
    pred = dict(zip(pool.column("id").to_pylist(), p.argmax(1).tolist()))
    labels = dict(zip(pseudo.column("id").to_pylist(), pseudo.column("label").to_pylist()))
    assert all(labels[i] == pred[i] for i in labels)
    assert set(pseudo.column("source").to_pylist()) == {"real"}
    assert min(pseudo.column("confidence").to_pylist()) >= 0.6
    assert set(pseudo.column("teacher").to_pylist()) == {teacher["key"]}
    # The labels mean something: against the hidden true labels (train_full), the confident rows are
    # mostly right and more often right than the teacher's accuracy on the whole pool.
    truth = _truth(d)
    kept_acc = np.mean([labels[i] == truth[i] for i in labels])
    pool_acc = np.mean([pred[i] == truth[i] for i in pred])
    assert kept_acc > 0.8 and kept_acc >= pool_acc

    # Students: labelled + every pseudo-labelled row, with real-only's optimiser steps.
    n_lab = read_manifest(d["train"])["num_rows"]
    spec = plan_mixture(d["train"], None, 0.0, 0, extra=res["dataset"])
    assert spec.n_real == n_lab and spec.num_rows == n_lab + res["n_pseudo"]
    loop = _loop_config(cfg.classify, spec, d["val"], 0, PL.teacher_classes(teacher), 1, "local")
    real_loop = _loop_config(cfg.classify, plan_mixture(d["train"], None, 0.0, 0), d["val"], 0,
                             PL.teacher_classes(teacher), 1, "local")
    assert loop["epoch_images"] == real_loop["epoch_images"] == n_lab
    rows = mixture_dataset(spec).count()
    assert rows == n_lab + res["n_pseudo"]
    (student,) = res["students"]
    assert student["n_train"] == n_lab + res["n_pseudo"] and student["key"] != teacher["key"]
    assert 0 <= student["top1"] <= 100

    # Everything is keyed: the same call returns the same results and rewrites nothing.
    mtime = storage.info(storage.join(res["dataset"], "manifest.json")).mtime
    again = P.stage_pseudolabel(cfg, d["train"], d["val"], d["pool"], teacher=teacher)
    assert again["students"][0]["top1"] == student["top1"] and again["dataset"] == res["dataset"]
    assert storage.info(storage.join(res["dataset"], "manifest.json")).mtime == mtime
    # The teacher is the run `synthaug classify --ratio 0` makes for its seed (same key, reused).
    (real0,) = PL.real_only_runs(cfg, d["train"], d["val"], storage.join(P.RunPaths(cfg).work, "classify"), seeds=[0])
    assert real0["key"] == teacher["key"] and real0["top1"] == teacher["metrics"]["top1"]
    # Another threshold is another set.
    other = PL.pseudolabel_key(replace(cfg, pseudolabel=replace(cfg.pseudolabel, threshold=0.7)), teacher, d["pool"])
    assert other != read_manifest(res["dataset"])["key"]


def test_top_fraction_per_class(setup, tmp_path):
    cfg, d, teacher = setup
    cfg = replace(cfg, pseudolabel=replace(cfg.pseudolabel, select="top_fraction", top_fraction=0.3))
    m = PL.label_pool(cfg, teacher, d["pool"], str(tmp_path / "top"))
    kept = read_table(str(tmp_path / "top"))
    pool = read_table(d["pool"], columns=["id", "image"])
    p = _probs(teacher, pool)
    pred, conf = p.argmax(1), p.max(1)
    ids = np.asarray(pool.column("id").to_pylist())
    kept_ids = set(kept.column("id").to_pylist())
    for c in range(p.shape[1]):
        n_c = int((pred == c).sum())
        assert m["counts"][str(c)] == math.ceil(0.3 * n_c), c
        inside = np.array([i in kept_ids for i in ids[pred == c]])
        if inside.any() and (~inside).any():  # the most confident of the class, none below the ones dropped
            assert conf[pred == c][inside].min() >= conf[pred == c][~inside].max()
    assert m["selection"] == {"select": "top_fraction", "top_fraction": 0.3}
    # Written in the pool's layout, not one shard per predicted class.
    assert blocked_shards(m) == [] and len(m["shards"]) >= 2


def _relabelled_synthetic(d: dict, path: str) -> tuple[str, set]:
    """A 'synthetic' set of real val images, every other one given a wrong intended class."""
    t = read_table(d["val"]).slice(0, 300)
    labels = np.asarray(t.column("label").to_pylist())
    wrong = np.arange(len(labels)) % 2 == 1
    labels = np.where(wrong, (labels + 3) % 10, labels)
    names = read_manifest(d["val"])["class_names"]
    syn = pa.table({"id": [f"s-{i}" for i in t.column("id").to_pylist()], "image": t.column("image"),
                    "label": pa.array(labels, pa.int64()), "class_name": [names[y] for y in labels],
                    "source": ["synthetic"] * len(labels), "seed": pa.array(np.arange(len(labels)), pa.int64())})
    write_dataset(syn, path, class_names=names, image_size=(8, 8), channels=1, config={})
    return path, {f"s-{i}" for i, w in zip(t.column("id").to_pylist(), wrong) if w}


def test_confidence_filter(setup, tmp_path):
    cfg, d, teacher = setup
    syn, wrong = _relabelled_synthetic(d, str(tmp_path / "syn"))
    cfg = replace(cfg, work_dir=str(tmp_path / "work"), filter=replace(cfg.filter, tau=0.3))
    out, m = P.stage_filter(cfg, syn, teacher)
    kept = read_table(out)
    src = read_table(syn)
    p = _probs(teacher, src)
    lab = np.asarray(src.column("label").to_pylist())
    target = p[np.arange(len(lab)), lab]
    assert set(kept.column("id").to_pylist()) == {i for i, q in zip(src.column("id").to_pylist(), target) if q >= 0.3}
    assert "seed" in m["columns"] and "teacher_prob" in m["columns"]  # provenance kept
    kept_ids = set(kept.column("id").to_pylist())
    right = set(src.column("id").to_pylist()) - wrong
    assert len(kept_ids & right) / len(right) > 2 * len(kept_ids & wrong) / len(wrong)  # the wrong labels go
    shares = PL.kept_per_class(m)
    assert all(shares[n] == m["counts"][n] / m["counts_before"][n] for n in m["class_names"])
    assert m["num_rows"] == len(kept_ids) < src.num_rows
    assert blocked_shards(m) == []  # a streaming filter: the synthetic set's class-mixed layout

    # The filtered set mixes like any synthetic set: class-balanced, seeded, nested across ratios.
    small, big = plan_mixture(d["train"], out, 0.1, 3), plan_mixture(d["train"], out, 0.2, 3)
    ids = lambda spec: set(mixture_dataset(spec).to_pandas().query("source == 'synthetic'").id)  # noqa: E731
    assert set(small.counts.values()) == {1} and set(big.counts.values()) == {2}
    assert ids(small) <= ids(big)
    # Keyed: the same call reuses the set; another tau is another location.
    again, _ = P.stage_filter(cfg, syn, teacher)
    assert again == out
    other, _ = P.stage_filter(replace(cfg, filter=replace(cfg.filter, tau=0.6)), syn, teacher)
    assert other != out and read_manifest(other)["num_rows"] <= m["num_rows"]


@pytest.mark.parametrize("override,msg", [
    ("pseudolabel.threshold=1.5", "pseudolabel.threshold"),
    ("pseudolabel.select=best", "unknown select"),
    ("pseudolabel.top_fraction=0", "pseudolabel.top_fraction"),
    ("pseudolabel.max_actors=0", "pseudolabel.min_actors"),
    ("filter.tau=-0.1", "filter.tau"),
    ("filter.tau=2", "filter.tau"),
])
def test_bad_values_name_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_cli_without_pool_is_one_line(tmp_path, capsys):
    rc = main(["pseudolabel", f"work_dir={tmp_path}", "--dry-run"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("synthaug pseudolabel: error: --pool:")


def test_report_rows_pair_by_seed():
    import pandas as pd

    from synthaug.report import _paired_row, headline_ratio

    real = pd.Series({0: 90.0, 1: 92.0, 2: 94.0})
    row = _paired_row(real, [{"seed": 2, "top1": 97.0}, {"seed": 0, "top1": 92.0}, {"seed": 1, "top1": 95.0}])
    assert row["mean"] == pytest.approx(94.667, abs=1e-3) and row["n_paired"] == 3
    assert row["gain_mean"] == pytest.approx(8 / 3) and row["gain_std"] == pytest.approx(np.std([2, 3, 3], ddof=1))
    assert not row["within"] and "better than real only (the interval excludes 0)" in row["verdict"]
    assert row["gain_ci95_low"] == pytest.approx(8 / 3 - 4.3027 * np.std([2, 3, 3], ddof=1) / np.sqrt(3), abs=1e-3)
    noisy = _paired_row(real, [{"seed": 0, "top1": 95.0}, {"seed": 1, "top1": 91.0}, {"seed": 2, "top1": 95.0}])
    assert noisy["within"] and "within noise" in noisy["verdict"]  # diffs 5, -1, 1
    on_test = _paired_row(real, [{"seed": 0, "top1": 99.0, "test_top1": 90.0}], "test_top1")
    assert on_test["mean"] == 90.0 and on_test["gain_mean"] == 0.0
    assert headline_ratio([0, 3, 1]) == 1.0 and headline_ratio([0, 3, 2]) == 2.0 and headline_ratio([0]) == 0.0
