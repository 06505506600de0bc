"""The latent cache: a dataset encoded through a latent family's VAE once, so epochs do not re-encode.

``pretrain.latent_cache`` / ``finetune.latent_cache`` (``dit``, ``text2image``) turn it on.
:func:`build` writes a contract dataset of its own (manifest last, keyed by content) whose
``image`` column holds, per row, the VAE posterior's moments as little-endian float32
bytes of shape ``(k, c, h, w)``:

* ``k = 2``: the mean and the log-variance (clamped to [-30, 20], as diffusers'
  ``DiagonalGaussianDistribution`` clamps it) of the image;
* ``k = 4`` when the run flips (``hflip``): the same two for the mirrored image, so a
  flip stays a flip of the pixels, not an approximation in latent space.

Training then draws ``z = mean + exp(logvar / 2) * eps`` with the same global-RNG draw
``latent_dist.sample()`` makes, scaled as :func:`synthaug.generative.latent.vae_encode`
scales it: the cached loss is the pixel path's loss (:func:`sample_moments`), without
running the encoder. The manifest records ``image_encoding: "latent-moments"`` and
``latent_shape``. Its key covers the data's content hash, the VAE's weights and ``hflip``;
a complete cache with the same key is reused.

The encoding runs in a Ray Data actor pool, one input shard per call, each writing the
shard of the same index under a fixed name (a retried call rewrites it), so memory is one
shard per actor and the layout is a function of the input's manifest alone.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from synthaug import identity, storage
from synthaug.artifacts import (BASE_COLUMNS, DatasetError, commit_dataset, hash_tree, new_write_id,
                                read_manifest, write_shard)
from synthaug.data.images import decode_batch, to_float
from synthaug.generative.vae import check_vae, factor, load_vae, sample_moments, vae_moments  # noqa: F401  (re-exported)

ENCODING = "latent-moments"


def decode_moments(images, latent_shape) -> np.ndarray:
    """A column of moment bytes -> float32 (B, k, c, h, w)."""
    shape = tuple(int(s) for s in latent_shape)
    if not len(images):
        return np.zeros((0, *shape), np.float32)
    return np.stack([np.frombuffer(b, dtype="<f4").reshape(shape) for b in images])


def vae_hash(base: str) -> str:
    """The content hash of a base's ``vae/`` tree (what the cache depends on)."""
    return hash_tree(storage.join(base, "vae"))


def cache_key(data_manifest: dict, base: str, hflip: bool) -> tuple[str, dict]:
    inputs = {"data": data_manifest["content_hash"], "vae": vae_hash(base)}
    return identity.artifact_key("latents", {"hflip": bool(hflip)}, inputs), inputs


class ShardEncoder:
    """Ray Data actor: encodes whole input shards and writes each as the cache shard of the same index."""

    def __init__(self, base: str, vae_key: str, data_loc: str, out: str, write_id: str, class_names: list[str],
                 hflip: bool, batch_size: int, use_gpu: bool):

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # Only the base's vae/ folder is needed (and copied, when the base is on an object store):
        # a text-to-image base's UNet and text encoder stay where they are.
        vae_dir = storage.localize(storage.join(base, "vae"), key=f"vae-{vae_key}/vae")
        self.vae = load_vae(vae_dir.parent).to(self.device)
        self.data_loc, self.out, self.write_id = data_loc, out, write_id
        self.class_names, self.hflip, self.batch_size = list(class_names), hflip, batch_size

    @torch.no_grad()
    def _encode(self, images: list[bytes], ids: list[str], where: str) -> list[bytes]:
        out = []
        for i in range(0, len(images), self.batch_size):
            b = slice(i, i + self.batch_size)
            x = torch.from_numpy(to_float(decode_batch(images[b], ids[b], where))).to(self.device)
            m = vae_moments(self.vae, x)
            if self.hflip:
                m = torch.cat([m, vae_moments(self.vae, x.flip(-1))], dim=1)
            out += [r.astype("<f4").tobytes() for r in m.cpu().numpy()]
        return out

    def __call__(self, batch: dict) -> dict:
        entries = []
        for index, rel in zip(batch["index"], batch["path"]):
            fs, path = storage.resolve(storage.join(self.data_loc, str(rel)))
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=list(BASE_COLUMNS))
            table = table.set_column(table.schema.get_field_index("image"), "image",
                                     pa.array(self._encode(table.column("image").to_pylist(), table.column("id").to_pylist(),
                                                          self.data_loc), pa.binary()))
            entries.append(write_shard(self.out, self.write_id, f"part-{int(index):05d}", table, self.class_names,
                                       ENCODING))
        return {"entry": [json.dumps(e) for e in entries]}


def build(data_dir: str, base: str, out: str, *, hflip: bool, batch_size: int = 64, use_gpu: bool = False,
          max_actors: int = 1, key: tuple[str, dict] | None = None) -> dict:
    """Encode contract dataset ``data_dir`` through ``base``'s VAE into ``out`` (or reuse it); its manifest.

    ``key``: :func:`cache_key`'s result, when the caller has it (hashing a VAE reads its weights).
    """
    import ray.data

    from synthaug.raylocal import actor_pool_kwargs

    data_dir, out = storage.absolute(data_dir), storage.absolute(out)
    m = read_manifest(data_dir)
    if m.get("image_encoding", "png") != "png":
        raise DatasetError(f"{data_dir}: image_encoding {m.get('image_encoding')!r}; the latent cache encodes PNG images")
    key, inputs = key or cache_key(m, base, hflip)
    done = identity.reuse(out, key, "latents", "the latent cache")
    if done is not None:
        return done
    from synthaug.generative.models import read_config

    # The VAE's shape from its config alone (its weights are read by the actors, not here).
    vae_key, where = inputs["vae"], storage.join(base, "vae", "config.json")
    vae_cfg = check_vae(base, read_config(where))
    f, size = factor(vae_cfg), int(m["image_size"][0])
    shape = [4 if hflip else 2, int(vae_cfg["latent_channels"]), size // f, size // f]
    write_id = new_write_id()
    rows = [{"index": i, "path": s["path"]} for i, s in enumerate(m["shards"])]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(ShardEncoder, batch_size=1, fn_constructor_kwargs=dict(
        base=base, vae_key=vae_key, data_loc=data_dir, out=out, write_id=write_id, class_names=list(m["class_names"]),
        hflip=hflip, batch_size=batch_size, use_gpu=use_gpu), **actor_pool_kwargs(1, max_actors, 1.0 if use_gpu else 0.0))
    entries = sorted((json.loads(r["entry"]) for r in ds.iter_rows()), key=lambda e: e["path"])
    if len(entries) != len(rows):
        raise DatasetError(f"{out}: {len(entries)} of {len(rows)} shards encoded")
    manifest = commit_dataset(
        out, entries, class_names=m["class_names"], image_size=m["image_size"], channels=m["channels"],
        config={"hflip": hflip, "base": base}, labelled=m.get("labelled", True), check_ids=False,
        extra={"stage": "latents", "key": key, "inputs": inputs, "image_encoding": ENCODING, "latent_shape": shape,
               "source": data_dir})
    print(f"[latents] {out}: {manifest['num_rows']} rows encoded (key {key[:12]})", flush=True)
    return manifest
