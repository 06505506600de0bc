"""CAS sanity and sample quality: real-as-synthetic ~ real-only, noise ~ chance, and a tiny
generator trained for a few hundred steps makes digits an in-domain classifier recognises."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from synthaug.artifacts import read_manifest, read_table, write_dataset
from synthaug.classify.train import fit
from synthaug.config import load_config, replace
from synthaug.data.images import encode_png
from synthaug.evaluate.cas import cas

RECIPE = ["classify.epochs=12", "classify.seeds=[0]", "classify.checkpoint_every=12"]


def _as_synthetic(real_dir, out, images=None):
    """The real set relabelled as synthetic (optionally with other images)."""
    t = read_table(real_dir)
    m = read_manifest(real_dir)
    imgs = t.column("image").to_pylist() if images is None else images
    table = pa.table({
        "id": ["syn-" + i for i in t.column("id").to_pylist()], "image": pa.array(imgs, pa.binary()),
        "label": t.column("label"), "class_name": t.column("class_name"), "source": ["synthetic"] * t.num_rows,
        "generator": ["none"] * t.num_rows, "seed": pa.array(range(t.num_rows), pa.int64()),
        "guidance_scale": [0.0] * t.num_rows, "sampler": ["none"] * t.num_rows, "steps": pa.array([0] * t.num_rows, pa.int64()),
    })
    write_dataset(table, out, class_names=m["class_names"], image_size=tuple(m["image_size"]), channels=m["channels"], config={})
    return out


def test_cas_of_real_matches_real_only_and_noise_is_chance(ray_session, digits_dirs, tmp_path):
    cfg = load_config(None, RECIPE)
    train, val = digits_dirs["train"], digits_dirs["val"]
    m = read_manifest(train)
    real_only = fit(cfg.classify, str(train), val, seed=0, out_dir=tmp_path / "r", name="real",
                    class_names=m["class_names"], in_chans=1)
    same = cas(cfg.classify, _as_synthetic(train, tmp_path / "syn"), val, train, tmp_path / "c", name="same")
    assert real_only["top1"] > 50
    assert abs(same["cas_top1_mean"] - real_only["top1"]) < 10
    rng = np.random.default_rng(0)
    noise = [encode_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(read_table(train).num_rows)]
    chance = cas(cfg.classify, _as_synthetic(train, tmp_path / "noise", noise), val, train, tmp_path / "c", name="noise")
    assert chance["cas_top1_mean"] < 25  # 10 classes: chance is 10%


def test_few_hundred_step_generator_samples_recognisable_digits(ray_session, digits_dirs, tmp_path):
    from synthaug.generative import finetune, models
    from synthaug.generative.diffusion import sample_images
    from synthaug.data.images import from_float, to_float

    cfg = load_config(None, ["finetune.steps=300", "finetune.batch_size=64", "finetune.lr=0.002",
                             "finetune.checkpoint_every=300", "classify.epochs=10", "classify.seeds=[0]"])
    finetune.run(cfg, "finetune", digits_dirs["train_full"], tmp_path / "gen", tmp_path / "ray")
    gen = models.load_generator(tmp_path / "gen", require_manifest=True)
    labels = [k for k in range(10) for _ in range(10)]
    x = sample_images(gen, labels, list(range(100)), guidance_scale=3.0, sampler="ddim", steps=25)
    # An in-domain classifier trained on real images only.
    m = read_manifest(digits_dirs["train_full"])
    ccfg = replace(cfg.classify, epochs=10)
    clf_dir = tmp_path / "clf"
    fit(ccfg, str(digits_dirs["train_full"]), digits_dirs["val"], seed=0, out_dir=clf_dir, name="clf",
        class_names=m["class_names"], in_chans=1, save_model=True)
    from synthaug.classify.models import load_classifier

    clf, _ = load_classifier(clf_dir / "model")
    with torch.no_grad():
        pred = clf(torch.from_numpy(to_float(from_float(x)))).argmax(1).numpy()
    acc = float((pred == np.asarray(labels)).mean())
    assert acc > 0.5, f"in-domain classifier recognises {acc:.0%} of the samples (chance 10%)"
