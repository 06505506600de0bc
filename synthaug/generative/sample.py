"""Class-balanced sampling with classifier-free guidance through a Ray Data actor pool.

The *plan* is a Ray Dataset of rows ``(id, label, class_name, index, seed)``; each seed
derives from (global seed, class, index), so an image is the same whatever the pool
size, batch size or retries. :class:`Sampler` loads the exported generator once per
actor and maps batches of plan rows to contract rows (PNG bytes + provenance).

Output directories are keyed by a content hash of the generator and the sampling
settings that change pixels, so a different config never reuses another's output.
Shards land in ``<out>.partial/`` as Ray writes them; a re-run samples only the ids
not yet there, and the manifest is written last when the set is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from synthaug.artifacts import DATA_DIR, DatasetError, atomic_write_json, finalize_dataset, hash_obj, read_manifest
from synthaug.config import Config, SampleConfig, to_dict
from synthaug.data.images import encode_png, from_float
from synthaug.generative import models
from synthaug.generative.diffusion import sample_images

PIXEL_KEYS = ("guidance_scale", "sampler", "steps", "ddpm_log_variance_v", "seed")  # settings that change images


def sample_seed(global_seed: int, label: int, index: int) -> int:
    """A 63-bit seed from (global seed, class, index), never from rank or batch."""
    digest = hashlib.sha256(f"{global_seed}/{label}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def class_counts(s: SampleConfig, class_names: list[str]) -> dict[str, int]:
    """Per-class image counts, checked against the generator's classes."""
    if not s.class_counts:
        return {c: s.per_class for c in class_names}
    unknown = [c for c in s.class_counts if c not in class_names]
    if unknown:
        raise DatasetError(f"config key 'sample.class_counts': class {unknown[0]!r} is not in the generator's manifest ({class_names})")
    return {c: int(n) for c, n in s.class_counts.items()}


def plan_table(s: SampleConfig, class_names: list[str]) -> pa.Table:
    """The sampling plan: one row per image to make."""
    rows = {"id": [], "label": [], "class_name": [], "index": [], "seed": []}
    for name, n in class_counts(s, class_names).items():
        k = class_names.index(name)
        for i in range(n):
            rows["id"].append(f"syn-c{k:04d}-{i:07d}")
            rows["label"].append(k)
            rows["class_name"].append(name)
            rows["index"].append(i)
            rows["seed"].append(sample_seed(s.seed, k, i))
    return pa.table({**rows, "label": pa.array(rows["label"], pa.int64()), "seed": pa.array(rows["seed"], pa.int64())})


class Sampler:
    """Ray Data callable class: loads the generator once, maps plan batches to contract rows.

    On a GPU the denoiser runs under bf16 autocast (fp16 where the GPU has no bf16) in
    channels_last, with diffusers' SDPA attention (its default processor) and, through
    ``sample_images``, in ``torch.inference_mode``; ``sample.compile`` adds ``torch.compile``
    (``compile_backend``: torch's default, or e.g. 'eager' to test the wiring cheaply).
    """

    def __init__(self, generator_dir: str, sample: dict, device: str | None = None, compile_backend: str = "inductor"):
        self.s = SampleConfig(**{k: v for k, v in sample.items()})
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.gen = models.load_generator(generator_dir, require_manifest=True)
        self.gen.to(self.device).model.eval()
        cuda = self.device.type == "cuda"
        if cuda:
            for part in (self.gen.model, self.gen.components.get("vae")):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        if self.s.compile:  # compiled lazily, on the first batch (and again per new batch shape)
            self.gen.model = torch.compile(self.gen.model, backend=compile_backend)
        self.gen_id = self.gen.manifest["weights_hash"][:16]
        self.autocast = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None

    def __call__(self, batch: dict) -> pa.Table:
        labels = [int(v) for v in batch["label"]]
        seeds = [int(v) for v in batch["seed"]]
        x = sample_images(self.gen, labels, seeds, guidance_scale=self.s.guidance_scale, sampler=self.s.sampler,
                          steps=self.s.steps, ddpm_log_variance_v=self.s.ddpm_log_variance_v,
                          device=self.device, autocast_dtype=self.autocast)
        imgs = from_float(x.float().cpu()).transpose(0, 2, 3, 1)  # (B, H, W, C) uint8
        n = len(labels)
        return pa.table({
            "id": pa.array(list(batch["id"]), pa.string()),
            "image": pa.array([encode_png(im) for im in imgs], pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "class_name": pa.array(list(batch["class_name"]), pa.string()),
            "source": pa.array(["synthetic"] * n, pa.string()),
            "generator": pa.array([self.gen_id] * n, pa.string()),
            "seed": pa.array(seeds, pa.int64()),
            "guidance_scale": pa.array([float(self.s.guidance_scale)] * n, pa.float64()),
            "sampler": pa.array([self.s.sampler] * n, pa.string()),
            "steps": pa.array([int(self.s.steps)] * n, pa.int64()),
        })


def sample_key(gen_manifest: dict, s: SampleConfig) -> str:
    """Content key of a sampled set: generator weights + the settings that change pixels + plan."""
    settings = {k: getattr(s, k) for k in PIXEL_KEYS}
    if s.compile:  # compiled kernels round differently (floats differ in the last bits), so never share a set;
        settings["compile"] = True  # added only when on, so keys of uncompiled sets stay as they were
    counts = class_counts(s, gen_manifest["class_names"])
    return hash_obj({"generator": gen_manifest["weights_hash"], "sample": settings, "counts": counts})[:16]


def default_out_dir(cfg: Config, key: str) -> Path:
    return Path(cfg.work_dir) / "samples" / key


def _written_ids(partial: Path) -> set[str]:
    """Ids in complete shards of an interrupted run; unreadable (half-written) shards are dropped."""
    ids: set[str] = set()
    for f in sorted((partial / DATA_DIR).glob("*.parquet")) if (partial / DATA_DIR).is_dir() else []:
        try:
            ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        except Exception:  # a shard cut off mid-write
            f.unlink()
    return ids


def run(cfg: Config, generator_dir: str | Path, out_dir: str | Path | None = None, *,
        stop_after_rows: int | None = None) -> tuple[Path, dict]:
    """Sample ``cfg.sample`` from an exported generator; returns (dataset dir, manifest).

    ``stop_after_rows`` samples only the first rows of the plan and leaves the set
    unfinished (as an interrupted run would); the next call completes it.
    """
    import ray.data

    from synthaug.raylocal import actor_pool_kwargs, init_ray

    s = cfg.sample
    # Check everything before any sampling.
    generator_dir = Path(generator_dir)
    if not (generator_dir / "manifest.json").is_file():
        raise models.GeneratorError(f"{generator_dir}: no manifest.json, so this is not a finished generator export")
    gen_manifest = read_manifest(generator_dir)
    class_names = gen_manifest["class_names"]
    key = sample_key(gen_manifest, s)
    out = Path(out_dir) if out_dir else default_out_dir(cfg, key)
    partial = out.parent / (out.name + ".partial")
    for d in (out, partial):
        marker = d / ("manifest.json" if d == out else "plan.json")
        if marker.is_file() and json.loads(marker.read_text()).get("sample_key") != key:
            raise DatasetError(f"{d}: holds a different sampling config's data (key "
                               f"{json.loads(marker.read_text()).get('sample_key')} != {key}); choose another output directory")
    if out.is_dir() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise DatasetError(f"{out}: exists without a manifest; refusing to overwrite it")
    if (out / "manifest.json").is_file():
        print(f"[sample] reusing complete set {out}")
        return out, read_manifest(out)

    plan = plan_table(s, class_names)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(partial / "plan.json", {"sample_key": key, "generator": str(generator_dir), "num_rows": plan.num_rows})
    done = _written_ids(partial)
    todo = plan.filter(pa.compute.invert(pa.compute.is_in(plan.column("id"), pa.array(sorted(done), pa.string()))))
    if stop_after_rows is not None:
        todo = todo.slice(0, stop_after_rows)

    # Stream the remaining plan rows through the actor pool.
    t0 = time.time()
    if todo.num_rows:
        init_ray(cfg.ray)
        ds = ray.data.from_arrow(todo).repartition(max(1, -(-todo.num_rows // s.batch_size)))
        ds = ds.map_batches(
            Sampler, fn_constructor_kwargs={"generator_dir": str(generator_dir.absolute()), "sample": to_dict(s)},
            batch_size=s.batch_size, batch_format="numpy",
            **actor_pool_kwargs(s.min_actors, s.max_actors, s.num_gpus_per_actor),
        )
        ds.write_parquet(str(partial / DATA_DIR))
    seconds = time.time() - t0
    print(f"[sample] {todo.num_rows} images in {seconds:.1f}s = {todo.num_rows / max(seconds, 1e-9):.1f} images/s "
          f"({s.sampler}, {s.steps} steps, w={s.guidance_scale})", flush=True)
    if stop_after_rows is not None:
        return partial, {"sampled": todo.num_rows, "complete": False}

    # Drop duplicate rows (a retried write), check completeness, then finalize.
    written = pq.read_table(partial / DATA_DIR)
    ids = written.column("id").to_pylist()
    if set(ids) != set(plan.column("id").to_pylist()):
        missing = len(set(plan.column("id").to_pylist()) - set(ids))
        raise RuntimeError(f"{partial}: {missing} planned images missing after sampling; re-run to complete")
    if len(ids) != len(set(ids)):
        _, first = np.unique(np.asarray(ids, dtype=object), return_index=True)
        written = written.take(pa.array(np.sort(first)))
        shutil.rmtree(partial / DATA_DIR)
        (partial / DATA_DIR).mkdir()
        pq.write_table(written, partial / DATA_DIR / "part-00000.parquet")
    (partial / "plan.json").unlink()
    manifest = finalize_dataset(
        partial, out, class_names=class_names, image_size=(gen_manifest["image_size"],) * 2,
        channels=gen_manifest["channels"], config=to_dict(cfg),
        extra={"stage": "sample", "sample_key": key, "generator_dir": str(generator_dir),
               "generator_weights_hash": gen_manifest["weights_hash"], "sample": to_dict(s),
               "sampled_this_run": todo.num_rows, "seconds_this_run": round(seconds, 2),
               "images_per_s_this_run": round(todo.num_rows / max(seconds, 1e-9), 2)},
    )
    return out, manifest
