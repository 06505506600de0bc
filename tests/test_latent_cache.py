"""The latent cache (``finetune.latent_cache``): a keyed contract dataset of VAE moments that
training reads instead of re-encoding every epoch.

* Ray-free: the cached path trains exactly as the pixel path (the same latent draws, flips
  included), and the written-out ``latent_dist.sample()`` is diffusers' own.
* Through Ray: ``finetune.run`` builds the cache once (a contract dataset: manifest with the
  data's counts, a key), trains from it, and a second build reuses it; a changed input is a
  new cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from synthaug import cli
from synthaug.artifacts import is_complete, read_manifest, read_table, shard_paths
from synthaug.config import ConfigError, TrainGenConfig, load_config
from synthaug.shuffle import blocked_shards
from synthaug.data.images import decode_batch, to_float
from synthaug.generative import finetune, latent_cache, models

CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def dit_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lc") / "dit"
    assert cli.main(["tiny-base", "--family", "dit", "--out", str(out)]) == 0
    return out


def test_written_out_sample_is_diffusers_latent_dist_sample(dit_base):
    vae = models.load_generator(dit_base, "dit", NAMES, image_size=8, channels=1).components["vae"]
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)
        ref = vae.encode(x.expand(-1, 3, -1, -1)).latent_dist.sample() * vae.config.scaling_factor
        torch.manual_seed(5)
        ours = latent_cache.sample_moments(vae, latent_cache.vae_moments(vae, x))
    assert torch.equal(ref, ours)


@pytest.mark.parametrize("hflip", [False, True])
def test_cached_moments_train_exactly_as_pixels(dit_base, hflip):
    """Two optimiser steps from pixels and from their cached moments: the same losses and weights."""
    t = TrainGenConfig(family="dit", base=str(dit_base), steps=2, batch_size=4, warmup_steps=0, hflip=hflip,
                       label_dropout=0.2)
    TrainCore = finetune.TrainCore
    a = TrainCore(t, str(dit_base), NAMES, 8, 1)
    b = TrainCore(t, str(dit_base), NAMES, 8, 1, moments=True)
    vae = b.gen.components["vae"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 10, (8,), generator=g)
    with torch.no_grad():
        m = latent_cache.vae_moments(vae, x)
        if hflip:
            m = torch.cat([m, latent_cache.vae_moments(vae, x.flip(-1))], dim=1)
    a.begin(), b.begin()
    for i in range(2):
        assert a.micro_step(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
        assert b.micro_step(m[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
        assert abs(a.last_loss - b.last_loss) < 1e-5, (i, a.last_loss, b.last_loss)
    # Weights: the same to 1e-5 but for a few elements. Adam's first steps move a weight by about
    # lr whatever the size of its gradient, so where a gradient is ~0 a last-bit difference in the
    # VAE's convolutions (their CPU kernels differ by batch shape and by processor) can flip that
    # update's sign: such an element differs by at most 2 lr per step, and there are few of them.
    p, q = torch.cat([v.detach().flatten() for v in a.params]), torch.cat([v.detach().flatten() for v in b.params])
    diff = (p - q).abs()
    assert float(diff.max()) <= 2 * t.lr * t.steps + 1e-6, float(diff.max())
    assert float((diff > 1e-5).float().mean()) < 1e-3, int((diff > 1e-5).sum())


def test_unet_has_no_latent_cache():
    with pytest.raises(ConfigError, match="finetune.latent_cache"):
        load_config(None, ["finetune.latent_cache=true", "finetune.family=unet"])


def test_finetune_builds_the_cache_once_and_trains_from_it(ray_session, digits_dirs, dit_base, tmp_path, capsys):
    train = digits_dirs["train"]
    cfg = load_config(CONFIGS / "finetune_tiny_dit.yaml", [
        f"work_dir={tmp_path}", f"finetune.base={dit_base}", "finetune.latent_cache=true", "finetune.num_workers=1",
        "finetune.cache=false"])
    out = finetune.run(cfg, "finetune", train, tmp_path / "gen", tmp_path / "ray")
    assert out["steps"] == 4 and is_complete(tmp_path / "gen")
    (loc,) = list((tmp_path / "latents").iterdir())
    m, src = read_manifest(loc), read_manifest(train)
    assert m["image_encoding"] == "latent-moments" and m["latent_shape"] == [2, 4, 4, 4]
    assert m["num_rows"] == src["num_rows"] and m["counts"] == src["counts"] and len(m["shards"]) == len(src["shards"])
    assert m["inputs"]["data"] == src["content_hash"] and loc.name == m["key"][:12]
    assert blocked_shards(m) == blocked_shards(src) == []  # one shard per source shard: its class mix
    # Row by row, the cache holds the moments of the image with the same id.
    rows, imgs = read_table(loc), read_table(train)
    assert rows.column("id").to_pylist() == imgs.column("id").to_pylist()
    vae = models.load_generator(dit_base, "dit", NAMES, image_size=8, channels=1).components["vae"]
    with torch.no_grad():
        want = latent_cache.vae_moments(vae, torch.from_numpy(to_float(decode_batch(imgs.column("image").to_pylist()[:4]))))
    got = latent_cache.decode_moments(rows.column("image").to_pylist()[:4], m["latent_shape"])
    assert np.allclose(got, want.numpy(), atol=1e-5)
    # For Hugging Face datasets the moments are plain bytes, not an Image (the labels are still classes).
    hf = json.loads(pq.read_schema(shard_paths(loc)[0]).metadata[b"huggingface"])["info"]["features"]
    assert hf["image"] == {"dtype": "binary", "_type": "Value"} and hf["label"]["names"] == NAMES
    capsys.readouterr()

    # Built once: the same inputs reuse it; a changed input (hflip) is a new cache.
    again = latent_cache.build(str(train), str(dit_base), str(loc), hflip=False)
    assert again == m and "reusing the latent cache" in capsys.readouterr().out
    flipped = latent_cache.build(str(train), str(dit_base), str(tmp_path / "flip"), hflip=True)
    assert flipped["key"] != m["key"] and flipped["latent_shape"] == [4, 4, 4, 4]
