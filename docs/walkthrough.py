# %% [markdown]
# # synthaug from Python: a walkthrough
#
# The default run on digits, shrunk to a couple of minutes on a laptop CPU: ingest,
# pretrain, fine-tune, sample, evaluate, sweep, pseudo-label and the report, through
# `synthaug.run`. Then its figures, one more synthetic set from the fine-tuned generator
# with a stage call, and that set opened with Hugging Face `datasets`.
#
# Open it as a notebook (VS Code, Jupyter with jupytext) or run it as a script:
# `python docs/walkthrough.py`. Everything it writes goes under `SYNTHAUG_WALKTHROUGH_DIR`
# (default: a new temporary directory). `tests/test_api.py` runs it.

# %%
import os
import tempfile

import synthaug

OUT = os.environ.get("SYNTHAUG_WALKTHROUGH_DIR") or tempfile.mkdtemp(prefix="synthaug-walkthrough-")
print("writing under", OUT)

# %% [markdown]
# ## The run
#
# No YAML file: the defaults (`synthaug/config.py`; digits, a tiny UNet, a tiny CNN) with
# overrides. Overrides take the same dotted keys as the command line
# (`["sample.per_class=8"]`), or a mapping: dotted keys, or a section and its keys, as
# here. These are `jobs/configs/tiny.yaml`'s sizes, fewer steps again and one guidance
# value: the numbers mean nothing, the wiring is what you see.

# %%
TINY = {
    "name": "walkthrough",
    "work_dir": f"{OUT}/runs",  # datasets, generators, checkpoints
    "results_dir": f"{OUT}/results",  # metrics.json, summary.md, plots
    "ingest": {"k_per_class": 5},  # 5 labelled images per class; the rest of train is the unlabelled pool
    "pretrain": {"steps": 10, "batch_size": 32, "cache": True, "checkpoint_every": 10},
    "finetune": {"steps": 10, "batch_size": 32, "cache": True, "checkpoint_every": 10},
    "sample": {"per_class": 8, "guidance_scale": 2.0, "steps": 4, "batch_size": 40},
    "evaluate": {"extractor_epochs": 1, "kid_subset_size": 20},
    "classify": {"epochs": 1, "seeds": [0], "cache": True},
    "sweep": {"guidance_scales": [2.0], "ratios": [0.0, 1.0]},
}
result = synthaug.run(None, TINY)

# %% [markdown]
# ## Its figures
#
# `result.metrics` is `metrics.json`: the headline (real only against real + synthetic,
# paired by seed), fidelity per guidance (`fid_w2`: FID at guidance 2), CAS, the near-copy
# share, the pseudo-label baseline, seconds per stage. One seed: noise cannot be judged.

# %%
m = result.metrics
for key in ("real_only_top1_mean", "real_plus_synthetic_top1_mean", "paired_gain_mean", "fid_w2",
            "cas_top1_mean_w2", "near_copy_share_w2", "pseudo_label_top1_mean", "seconds_total"):
    print(f"{key:32s} {m[key]}")
print("report:", os.path.join(result.results_dir, "summary.md"))
print("generator:", result.generator)
print("synthetic sets:", result.synthetic)

# %% [markdown]
# ## One stage on its own
#
# Every stage is a call too (`synthaug.sample`, `synthaug.api.evaluate`, ...). Here: another
# synthetic set from the run's fine-tuned generator, at guidance 1 and 4 images per class.
# `result.config` is the run's resolved config; the overrides apply on top. Sampled sets are
# keyed by content (under `<work_dir>/samples/`), so calling it again reuses the set.

# %%
more = synthaug.sample(result.config, sample={"guidance_scale": 1.0, "per_class": 4})
print(more.dataset, more.metrics["num_rows"], "rows")

# %% [markdown]
# ## The synthetic set in Hugging Face `datasets`
#
# A contract dataset is Parquet shards listed by `manifest.json` (columns `id`, `image`
# (PNG), `label`, `class_name`, `source`; see docs/dataset-contract.md), so any Parquet
# reader opens it. Read the shards the manifest lists: a directory without a manifest is
# unfinished. The image column comes back as PIL images where the shards carry Hugging
# Face's image feature and as PNG bytes where they do not; casting to `datasets.Image()`
# gives PIL images either way.

# %%
import datasets  # noqa: E402

from synthaug.artifacts import read_manifest  # noqa: E402

shards = [os.path.join(more.dataset, s["path"]) for s in read_manifest(more.dataset)["shards"]]
ds = datasets.load_dataset("parquet", data_files=shards, split="train", cache_dir=f"{OUT}/hf-datasets")
if not isinstance(ds.features["image"], datasets.Image):
    ds = ds.cast_column("image", datasets.Image())
first = ds[0]
print(len(ds), "images;", ds.features)
print("first:", first["class_name"], "label", first["label"], first["image"].size, first["image"].mode)
first["image"]  # a notebook shows the image

# %% MLflow
# Track the run in MLflow: set SYNTHAUG_MLFLOW_URI (e.g. http://127.0.0.1:5000 or
# file:/tmp/mlruns) and the same run goes again with `tracking.mlflow_uri` (everything it
# made is reused by content), then lists the runs MLflow recorded. Skipped when unset.
MLFLOW_URI = os.environ.get("SYNTHAUG_MLFLOW_URI", "")
if MLFLOW_URI:
    import mlflow

    synthaug.run(result.config, {"tracking.mlflow_uri": MLFLOW_URI, "tracking.experiment": "walkthrough"})
    mlflow.set_tracking_uri(MLFLOW_URI)
    runs = mlflow.search_runs(experiment_names=["walkthrough"])
    print(runs[["tags.mlflow.runName", "status", "start_time"]].head(12))
    # The same runs in the browser: `mlflow ui --backend-store-uri <uri>` or the server's own page.
