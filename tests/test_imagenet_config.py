"""jobs/configs/imagenet.yaml (the paper's setting) and imagenet-smoke.yaml (the same on a slice).

The full config cannot run here; these tests keep it from rotting: it loads with the real
config loader, says what the paper did, and the smoke config differs from it only in sizes,
step counts, paths and hardware. The smoke run itself (slice + tiny base built in tmp, then
ingest -> fine-tune -> sample through the CLI, with real Ray, diffusers and Parquet) is
``test_imagenet_smoke_runs``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path


from synthaug.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "jobs" / "configs" / "imagenet.yaml"
SMOKE = ROOT / "jobs" / "configs" / "imagenet-smoke.yaml"

# What the smoke config may change: scale, paths, hardware, and the extractor (Inception's
# weights are not in CI).
SMOKE_MAY_DIFFER = {
    "name", "work_dir", "ingest.path", "ingest.image_size", "finetune.base", "finetune.steps", "finetune.batch_size",
    "finetune.warmup_steps", "finetune.checkpoint_every", "finetune.num_workers", "finetune.use_gpu",
    "finetune.mixed_precision", "finetune.gradient_checkpointing", "finetune.cache",
    "sample.per_class", "sample.steps", "sample.batch_size", "sample.max_actors", "sample.num_gpus_per_actor",
    "evaluate.extractor", "evaluate.extractor_epochs", "evaluate.kid_subset_size", "evaluate.batch_size",
    "classify.epochs", "classify.batch_size", "classify.warmup_epochs", "classify.checkpoint_every",
    "classify.num_workers", "classify.use_gpu",
}


def _script():
    spec = importlib.util.spec_from_file_location("make_imagenet_slice", ROOT / "scripts" / "make_imagenet_slice.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "class_counts":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_imagenet_config_is_the_papers_setting():
    cfg = load_config(FULL)
    i, f, s, c = cfg.ingest, cfg.finetune, cfg.sample, cfg.classify
    assert i.source in ("parquet", "imagefolder") and i.path.startswith("s3://")
    assert (i.image_size, i.mode, i.k_per_class) == (256, "RGB", 0)
    assert list(i.class_names) == _script().imagenet_class_names()
    assert 49_000 < round(1_281_167 * i.val_fraction) < 51_000, "the FID reference is ~50K real val images"
    assert f.family == "text2image" and "{class_name}" in f.prompt_template
    assert f.base.startswith("/") and not f.base.startswith("/work"), "a local base on shared storage, not a hub id"
    assert s.per_class * len(i.class_names) == 1_200_000 and not s.class_counts
    assert s.guidance_scale == 1.25 and s.sampler == "dpmsolver++" and s.steps <= 50
    assert c.model == "resnet50" and not c.pretrained_path
    assert sorted(float(r) for r in cfg.sweep.ratios) == [0.0, 1.0] and list(cfg.sweep.guidance_scales) == [1.25]
    assert cfg.evaluate.extractor == "inception-v3-compat"
    assert f.use_gpu and c.use_gpu and s.num_gpus_per_actor == 1


def test_smoke_config_is_the_same_config_scaled_down():
    full, smoke = _flat(to_dict(load_config(FULL))), _flat(to_dict(load_config(SMOKE)))
    differ = {k for k in full if full[k] != smoke[k]}
    assert differ <= SMOKE_MAY_DIFFER, f"imagenet-smoke.yaml departs from imagenet.yaml in {sorted(differ - SMOKE_MAY_DIFFER)}"
    assert smoke["ingest.image_size"] == 64 and not smoke["finetune.use_gpu"]


def test_slice_is_imagenet_shaped(tmp_path):
    import pyarrow.parquet as pq

    path = _script().make_slice(tmp_path, per_class=2, size=64, num_classes=1000)
    t = pq.read_table(path)
    assert t.num_rows == 2000 and sorted(set(t.column("label").to_pylist())) == list(range(1000))
    assert set(t.column("image").type.names) == {"bytes", "path"}
    # Same bytes on every run: the slice is a fixture, not a draw.
    again = _script().make_slice(tmp_path / "again", per_class=2, size=64, num_classes=1000)
    assert pq.read_table(again).equals(t)


def test_imagenet_smoke_runs(ray_session, tmp_path, monkeypatch, capsys):
    """The smoke config through the CLI: ingest, fine-tune and sample (real Ray, real diffusers).

    Evaluate and the classifier trainings (ResNet-50 at 64 px) are not run here: they are
    minutes more on a CPU; the configs test above keeps their keys in step.
    """
    from synthaug.cli import main
    from synthaug.generative.tiny import save_tiny_base

    timings = {}
    t0 = time.time()
    _script().make_slice(tmp_path / "slice", per_class=2, size=64)
    save_tiny_base("text2image", tmp_path / "base")
    timings["slice + base"] = time.time() - t0
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(SMOKE), f"work_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}",
              f"ingest.path={tmp_path / 'slice'}", f"finetune.base={tmp_path / 'base'}"]
    # Sampling writes one shard per (class, index range) chunk, so 1000 classes x 1 image are
    # 1000 actor calls (~0.3-0.6 s each here): the smoke run samples 10 of the classes.
    import json

    ten = {name: 1 for name in _script().imagenet_class_names()[:10]}
    extra = {"sample": [f"sample.class_counts={json.dumps(ten)}"]}
    for stage in ("ingest", "finetune", "sample"):
        t0 = time.time()
        assert main([stage, *common, *extra.get(stage, [])]) == 0, stage
        timings[stage] = time.time() - t0
    run = tmp_path / "runs" / "imagenet-smoke"
    from synthaug.artifacts import read_manifest

    assert read_manifest(run / "data" / "train")["num_rows"] == 1000
    assert read_manifest(run / "data" / "val")["num_rows"] == 1000
    assert (run / "generators" / "finetune" / "manifest.json").is_file()
    samples = [d for d in (tmp_path / "runs" / "samples").iterdir() if (d / "manifest.json").is_file()]
    assert len(samples) == 1 and read_manifest(samples[0])["num_rows"] == 10
    with capsys.disabled():
        print("\nimagenet-smoke timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
