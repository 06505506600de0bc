"""Image-to-image sampling (``sample.init: real``, SDEdit): the core, the sources, the sampled
sets through the Ray Data actor pool for every family, the CLI, and bad input.

The generators are tiny random-weight exports built here (no training): the unet from
synthaug's 'tiny' preset, the latent families from :mod:`synthaug.generative.tiny`'s bases,
each saved with ``save_generator`` as a fine-tune would export it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pytest
import torch

from synthaug import cli, storage
from synthaug.artifacts import DatasetError, read_manifest, read_table
from synthaug.config import ConfigError, SampleConfig, load_config
from synthaug.data.images import decode_batch, to_float
from synthaug.generative import models, sample, sources
from synthaug.generative.diffusion import sample_images
from synthaug.generative.tiny import TINY_FAMILIES, save_tiny_base

NAMES = [str(i) for i in range(10)]
TINY = ["sample.steps=4", "sample.batch_size=4", "sample.per_class=3", "sample.init=real", "sample.strength=0.5"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> a tiny random-weight generator export (manifest included) for 8 px grayscale digits."""
    root = tmp_path_factory.mktemp("img2img-gens")
    out = {}
    for family in TINY_FAMILIES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if family == "unet":
                gen = models.new_generator("unet", "tiny", NAMES, 8, 1)
            else:
                save_tiny_base(family, root / f"base-{family}")
                gen = models.load_generator(root / f"base-{family}", family, NAMES, image_size=8, channels=1)
        models.save_generator(gen, root / family, {"steps": 0})
        out[family] = root / family
    return out


def _sources(train_dir, n=3):
    """The first ``n`` train images (pixels in [-1, 1]) and labels."""
    t = read_table(train_dir).sort_by("id").slice(0, n)
    return torch.from_numpy(to_float(decode_batch(t.column("image").to_pylist()))), t.column("label").to_pylist()


def _images(d):
    t = read_table(d).sort_by("id")
    return dict(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))


# ----------------------------------------------------------------------------- config and key


def test_config_keys_are_typed_and_validated():
    s = load_config(None, []).sample
    assert (s.init, s.strength, s.source) == ("noise", 0.5, "")
    s = load_config(None, ["sample.init=real", "sample.strength=0.25", "sample.source=/data/train"]).sample
    assert (s.init, s.strength, s.source) == ("real", 0.25, "/data/train")
    for over, msg in [(["sample.init=image"], "unknown init 'image'"), (["sample.strength=0"], r"must be in \(0, 1\]"),
                      (["sample.strength=1.5"], r"must be in \(0, 1\]"), (["sample.strength=abc"], "cannot read"),
                      (["sample.init=real", "sample.steps=10", "sample.strength=0.05"], "leaves no denoising step")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, over)
    load_config(None, ["sample.steps=10", "sample.strength=0.05"])  # init 'noise' runs every step: no product check


def test_content_key_of_noise_sets_is_fixed_and_real_sets_key_their_source():
    m = {"weights_hash": "0123abcd", "class_names": ["a", "b"]}
    # Fixed keys: a sampled set is found and reused only while its seeds are drawn the same way. Before
    # keys.VERSION 2 (sample seeds from keys.row_keys) they were e235f3c64b5d6d83 and f10b35b849767724.
    assert sample.sample_key(m, SampleConfig()) == "3f4446e48b508435"
    assert sample.sample_key(m, SampleConfig(guidance_scale=1.0, steps=7, per_class=3)) == "f36607750f090470"
    assert sample.sample_key(m, SampleConfig(strength=0.9, source="/x")) == "3f4446e48b508435"  # unused by 'noise'
    real = SampleConfig(init="real", strength=0.5)
    keys = {sample.sample_key(m, real, "h1"), sample.sample_key(m, real, "h2"),
            sample.sample_key(m, SampleConfig(init="real", strength=0.6), "h1"), sample.sample_key(m, SampleConfig())}
    assert len(keys) == 4
    assert sample.sample_key(m, SampleConfig(init="real", source="/elsewhere"), "h1") == sample.sample_key(m, real, "h1")
    with pytest.raises(ValueError, match="content hash"):
        sample.sample_key(m, real)
    assert sample.columns(real) == [*sample.COLUMNS, "source_id", "strength"] and sample.columns(SampleConfig()) == sample.COLUMNS


# ----------------------------------------------------------------------------- the core, without Ray


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++"])
def test_pixel_core_stays_near_the_source_at_low_strength(exports, digits_dirs, sampler):
    gen = models.load_generator(exports["unet"], require_manifest=True)
    x, labels = _sources(digits_dirs["train"])
    seeds = [1, 2, 3]
    run = lambda s, steps=10: sample_images(gen, labels, seeds, guidance_scale=2.0, sampler=sampler,  # noqa: E731
                                            steps=steps, init=x, strength=s)
    near, mid = run(0.02, 50), run(0.5)  # 1 of 50 steps, 5 of 10
    d_near, d_mid = float((near - x).abs().mean()), float((mid - x).abs().mean())
    assert d_near < 0.08 < d_mid, (d_near, d_mid)
    # The same seeds give the same images however the batch is cut.
    parts = torch.cat([sample_images(gen, labels[i:i + 2], seeds[i:i + 2], guidance_scale=2.0, sampler=sampler, steps=10,
                                     init=x[i:i + 2], strength=0.5) for i in (0, 2)])
    assert torch.allclose(parts, mid, atol=1e-4)
    if sampler == "ddim":
        # At strength 1 every step runs from t = 999, where the cosine schedule keeps a few thousandths of
        # the source: the images are (nearly) those of text-to-image sampling with the same seeds.
        full = run(1.0)
        noise = sample_images(gen, labels, seeds, guidance_scale=2.0, sampler=sampler, steps=10)
        assert float((full - noise).abs().mean()) < 0.01 and float((full - noise).abs().max()) < 0.06
        assert float((full - x).abs().mean()) > 0.3


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++"])
def test_start_is_the_encoded_source_noised_to_the_strengths_timestep(exports, digits_dirs, family, sampler):
    """Against an independent reference: sqrt(abar_t) z0 + sqrt(1 - abar_t) eps at t = timesteps[steps - int(steps s)],
    z0 the VAE posterior's mean x scaling factor (latent families; the pixels for unet)."""
    from synthaug.generative.diffusion import make_scheduler, noised_source, per_sample_noise

    gen = models.load_generator(exports[family], require_manifest=True)
    x, _ = _sources(digits_dirs["train"], 4)
    if family == "unet":
        z0 = x
    else:
        vae = gen.components["vae"]
        z0 = vae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean.detach() * vae.config.scaling_factor
    eps, _ = per_sample_noise([1, 2, 3, 4], gen.latent_shape)
    for steps, strength in [(50, 0.3), (10, 1.0), (4, 0.5), (50, 0.02)]:
        sched = make_scheduler(sampler, gen.scheduler_config)
        sched.set_timesteps(steps)
        with torch.no_grad():
            got, timesteps = noised_source(gen, sched, x, eps, steps, strength)
        all_t = [int(t) for t in sched.timesteps]
        assert timesteps == all_t[steps - int(steps * strength):] and len(timesteps) == int(steps * strength)
        abar = sched.alphas_cumprod[timesteps[0]].double()
        want = abar.sqrt() * z0.double() + (1 - abar).sqrt() * eps.double()
        assert torch.allclose(got.double(), want, atol=1e-5), (steps, strength, float((got - want).abs().max()))


@pytest.mark.parametrize("family", ["dit", "text2image"])
def test_latent_core_follows_its_source(exports, digits_dirs, family):
    """Latent families: the encoding is the VAE's mean (no random draw), and lower strength stays nearer it."""
    gen = models.load_generator(exports[family], require_manifest=True)
    x, labels = _sources(digits_dirs["train"], 4)
    with torch.no_grad():
        z = gen.encode(x, deterministic=True)
        assert torch.equal(z, gen.encode(x, deterministic=True)) and not torch.equal(gen.encode(x), gen.encode(x))
        rec = gen.decode(z).clamp(-1, 1)  # what the random-weight VAE makes of each source
    run = lambda s, steps, init=x: sample_images(gen, labels, [1, 2, 3, 4], guidance_scale=2.0,  # noqa: E731
                                                 steps=steps, init=init, strength=s)
    near, full = run(0.02, 50), run(1.0, 10)  # 1 of 50 steps, 10 of 10
    assert float((near - rec).abs().mean()) < float((full - rec).abs().mean())
    assert not torch.allclose(run(0.02, 50, x.flip(0)), near, atol=1e-3)  # another source, another image


# ----------------------------------------------------------------------------- the sources


def test_source_of_each_sample_is_a_seeded_cycle_over_the_class(ray_session, digits_dirs):
    train = str(digits_dirs["train"])
    idx = sources.source_index(train, seed=0)
    t = read_table(train)
    assert idx.num_rows == t.num_rows and idx.column_names == ["label", "id", "shard"]
    by_class = {c: sorted(i for i, y in zip(t.column("id").to_pylist(), t.column("label").to_pylist()) if y == c)
                for c in range(10)}
    for c in (0, 7):
        ids, shards = sources.source_rows(idx, c, 0, 25)
        n = len(by_class[c])
        assert sorted(ids[:n]) == by_class[c]  # one pass over the class before any repeat
        assert ids[n:] == ids[:25 - n] and len(set(ids)) == n  # then the same order again (i mod n_c)
        # The order is the seeded key's, computed independently here.
        keys = sources.source_order_key(0, by_class[c])
        assert ids[:n] == [i for _, i in sorted(zip(keys.tolist(), by_class[c]))]
        # A chunk's slice is the same as the whole range's: nothing depends on chunking.
        assert sources.source_rows(idx, c, 13, 17)[0] == ids[13:17]
        pngs = sources.read_sources(storage.resolve(train)[0], ids[:4], shards[:4])
        want = dict(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))
        assert pngs == [want[i] for i in ids[:4]]
    other = sources.source_index(train, seed=1)
    assert sources.source_rows(other, 0, 0, 10)[0] != sources.source_rows(idx, 0, 0, 10)[0]  # the seed reorders
    assert sorted(sources.source_rows(other, 0, 0, 10)[0]) == sorted(sources.source_rows(idx, 0, 0, 10)[0])


# ----------------------------------------------------------------------------- through the actor pool


def test_img2img_set_is_invariant_to_pool_and_chunking_and_records_its_sources(ray_session, exports, digits_dirs, tmp_path):
    gen_dir, train = exports["unet"], str(digits_dirs["train"])
    over = TINY + ["sample.class_counts={'0': 12, '7': 11}"]  # more than the 10 images per class: sources repeat
    a, ma = sample.run(load_config(None, over + ["sample.batch_size=5"]), gen_dir, tmp_path / "a", source_dir=train)
    cfg_b = load_config(None, over + ["sample.min_actors=2", "sample.max_actors=2", "sample.batch_size=3",
                                      "sample.chunk_size=7"])
    part, info = sample.run(cfg_b, gen_dir, tmp_path / "b", source_dir=train, stop_after_rows=10)  # interrupted
    assert info["complete"] is False
    b, mb = sample.run(cfg_b, gen_dir, tmp_path / "b", source_dir=train)  # resumed
    assert _images(a) == _images(b) and ma["content_hash"] == mb["content_hash"]
    assert 0 < info["sampled"] < 23 and mb["sampled_this_run"] == 23 - info["sampled"]  # only the missing chunks
    assert ma["num_rows"] == 23 and ma["columns"] == sample.columns(cfg_b.sample)
    assert ma["source_content_hash"] == read_manifest(train)["content_hash"] and ma["source_dir"] == train
    assert ma["sample"]["init"] == "real" and ma["sample"]["strength"] == 0.5

    # Provenance: each row names its source, the class's image at position i mod 10 of the seeded order.
    rows = read_table(a)
    idx = sources.source_index(train, seed=0)
    real = read_table(train)
    real_label = dict(zip(real.column("id").to_pylist(), real.column("label").to_pylist()))
    for r in rows.to_pylist():
        c, i = r["label"], int(r["id"].rsplit("-", 1)[1])
        assert r["source_id"] == sources.source_rows(idx, c, i, i + 1)[0][0] and real_label[r["source_id"]] == c
        assert r["strength"] == 0.5 and r["seed"] == sample.sample_seed(0, c, i)
    used = {c: {r["source_id"] for r in rows.to_pylist() if r["label"] == c} for c in (0, 7)}
    assert all(len(v) == 10 for v in used.values())  # every real image of the class is used

    assert mb["sample_key"] == ma["sample_key"] != sample.sample_key(read_manifest(gen_dir), load_config(
        None, [o for o in over if not o.startswith("sample.init")]).sample)  # not the text-to-image set's key


def test_img2img_at_low_strength_keeps_each_source(ray_session, exports, digits_dirs, tmp_path):
    """Through the actors, at 1 of 50 steps, every sample sits by its own source, not its class's others."""
    train = str(digits_dirs["train"])
    out, _ = sample.run(load_config(None, TINY + ["sample.steps=50", "sample.strength=0.02", "sample.per_class=2"]),
                        exports["unet"], tmp_path / "s", source_dir=train)
    rows = read_table(out).to_pylist()
    real = read_table(train)
    px = dict(zip(real.column("id").to_pylist(), to_float(decode_batch(real.column("image").to_pylist()))))
    got = to_float(decode_batch([r["image"] for r in rows]))
    own = np.array([np.abs(g - px[r["source_id"]]).mean() for g, r in zip(got, rows)])
    others = np.array([min(np.abs(g - v).mean() for k, v in px.items() if k != r["source_id"]) for g, r in zip(got, rows)])
    assert own.max() < 0.08 and (own < others).all(), (own.max(), (own < others).mean())


@pytest.mark.parametrize("family", ["dit", "text2image"])
def test_latent_families_sample_img2img_sets(ray_session, exports, digits_dirs, tmp_path, family):
    """Two actors, chunks of 2 in batches of 1, against one in-process Sampler over a whole class per batch."""
    train = str(digits_dirs["train"])
    over = TINY + ["sample.per_class=2"]
    a, ma = sample.run(load_config(None, over + ["sample.min_actors=2", "sample.max_actors=2", "sample.batch_size=1"]),
                       exports[family], tmp_path / "a", source_dir=train)
    assert ma["num_rows"] == 20 and ma["columns"] == sample.columns(load_config(None, over).sample)
    rows = read_table(a).sort_by("id")
    local = sample.Sampler(str(exports[family]), {"steps": 4, "strength": 0.5, "init": "real"})
    idx, fs = sources.source_index(train, 0), storage.resolve(train)[0]
    for c in (0, 9):
        plan = sample.plan_rows(c, str(c), 0, 2, 0).to_pydict()
        ids, shards = sources.source_rows(idx, c, 0, 2)
        got = local({**plan, "source_id": ids, "source_image": sources.read_sources(fs, ids, shards)})
        mine = rows.filter(pa.compute.equal(rows.column("label"), c))
        assert got.column("source_id").to_pylist() == mine.column("source_id").to_pylist() == ids
        diff = np.abs(decode_batch(got.column("image").to_pylist()).astype(int)
                      - decode_batch(mine.column("image").to_pylist()).astype(int))
        assert diff.max() <= 1  # the same images, up to the last bit of a batch-size-dependent float sum


def test_cli_sample_starts_from_the_runs_train_split(ray_session, exports, digits_dirs, tmp_path):
    """`synthaug sample --generator G sample.init=real`: the sources default to <work_dir>/<name>/data/train."""
    work = tmp_path / "work"
    shutil.copytree(digits_dirs["train"], work / "default" / "data" / "train")
    out = tmp_path / "out"
    argv = ["sample", "--generator", str(exports["unet"]), "--out", str(out), f"work_dir={work}", *TINY,
            "sample.per_class=1"]
    assert cli.main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["source_dir"] == str(work / "default" / "data" / "train") and m["num_rows"] == 10
    assert m["source_content_hash"] == read_manifest(digits_dirs["train"])["content_hash"]
    # Another real set (here: the val split) is another set: a different key, refused in the same place.
    assert cli.main([*argv, f"sample.source={digits_dirs['val']}"]) == 2
    assert cli.main(["sample", "--dry-run", f"work_dir={work}", "sample.init=real", f"sample.source={tmp_path}/none"]) == 2


def test_img2img_bad_sources(ray_session, exports, digits_dirs, tmp_path):
    cfg = load_config(None, TINY)
    with pytest.raises(DatasetError, match="init 'real' needs a real contract dataset"):
        sample.run(cfg, exports["unet"], tmp_path / "x")
    wrong = tmp_path / "wrong"
    shutil.copytree(digits_dirs["train"], wrong)
    m = read_manifest(wrong)
    (wrong / "manifest.json").write_text(json.dumps({**m, "image_size": [16, 16]}))
    with pytest.raises(DatasetError, match=r"holds \[16, 16\] x 1-channel images, the generator makes \[8, 8\]"):
        sample.run(cfg, exports["unet"], tmp_path / "x", source_dir=wrong)
    (wrong / "manifest.json").write_text(json.dumps({**m, "class_names": list("abcdefghij")}))
    with pytest.raises(DatasetError, match="has classes"):
        sample.run(cfg, exports["unet"], tmp_path / "x", source_dir=wrong)
    (wrong / "manifest.json").write_text(json.dumps({**m, "counts": {**m["counts"], "3": 0}}))
    with pytest.raises(DatasetError, match="no image of class '3'"):
        sample.run(cfg, exports["unet"], tmp_path / "x", source_dir=wrong)
    assert not (tmp_path / "x").exists()


def test_sweep_strength_axis_samples_each_setting_once(ray_session, exports, digits_dirs, tmp_path):
    """``sweep.strengths`` ([null, 0.3]): one text-to-image and one image-to-image set per guidance,
    each sampled once (a second call reuses both by content key) and handed to the sweep by setting."""
    from synthaug import pipeline as P
    from synthaug.sweep import settings

    work = tmp_path / "work"
    shutil.copytree(digits_dirs["train"], work / "default" / "data" / "train")
    shutil.copytree(exports["unet"], work / "default" / "generators" / "finetune")
    cfg = load_config(None, [f"work_dir={work}", "sample.steps=4", "sample.batch_size=10", "sample.per_class=1",
                             "sample.guidance_scale=1.0", "sweep.guidance_scales=[1.0]", "sweep.strengths=[null, 0.3]"])
    assert settings(cfg) == [(1.0, None, 0.0), (1.0, 0.3, 0.0)]
    sets, mix, filtered, teacher = P.synthetic_sets(cfg)
    assert set(mix) == {(1.0, None, 0.0), (1.0, 0.3, 0.0)} and not filtered and teacher is None
    assert sets == {1.0: mix[(1.0, None, 0.0)]}  # the sample config's recipe (text-to-image) is what is evaluated
    noise, img2img = read_manifest(mix[(1.0, None, 0.0)]), read_manifest(mix[(1.0, 0.3, 0.0)])
    assert noise["sample"]["init"] == "noise" and img2img["sample"]["init"] == "real"
    assert img2img["sample"]["strength"] == 0.3 and img2img["source_content_hash"] == read_manifest(digits_dirs["train"])["content_hash"]
    assert noise["content_hash"] != img2img["content_hash"]
    stamp = lambda v: (Path(v) / "manifest.json").stat().st_mtime_ns  # noqa: E731
    stamps = {k: stamp(v) for k, v in mix.items()}
    _, again, _, _ = P.synthetic_sets(cfg)
    assert again == mix and all(stamp(v) == stamps[k] for k, v in again.items())
