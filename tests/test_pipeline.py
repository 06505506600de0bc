"""The whole default pipeline, tiny, through the CLI a user calls (one real local Ray).

In CI the tiny pipeline runs through ``ray job submit`` on the S3 server across two nodes
(``test_multinode.py``, which checks its outputs with :func:`check_run_outputs` below; the
same run is the undisturbed reference of its stop-and-resubmit test), and on a local path
through the Python API (``test_api.py``, docs/walkthrough.py). The same run in this process,
with ``work_dir`` and ``results_dir`` on S3 or on local disk, is kept for debugging the
in-process CLI (``pytest tests/test_pipeline.py --runpipeline``) and skipped in the suite,
where it would run the same stages again.
"""

from __future__ import annotations

import json

import pytest

from synthaug import storage
from synthaug.artifacts import is_complete, read_manifest
from synthaug.cli import main

# Fewer steps than tiny.yaml: this checks the wiring and the storage, not the numbers.
FAST = ["pretrain.steps=10", "classify.epochs=1", "evaluate.extractor_epochs=1"]


@pytest.fixture(params=["local", "s3"])
def run_dirs(request, tmp_path, s3_server):
    """(work_dir, results_dir) on local disk, or both on the S3 server."""
    if not request.config.getoption("--runpipeline"):
        pytest.skip("the tiny pipeline runs in test_multinode.py (S3) and test_api.py (local path); "
                    "pass --runpipeline to run it in this process too")
    if request.param == "local":
        return str(tmp_path / "runs"), str(tmp_path / "results")
    root = s3_server.root("pipeline")
    return storage.join(root, "runs"), storage.join(root, "results")


def test_tiny_pipeline_end_to_end(run_dirs, ray_session):
    work, results = run_dirs
    rc = main(["run", "--config", "jobs/configs/tiny.yaml", f"work_dir={work}", f"results_dir={results}", *FAST])
    assert rc == 0
    check_run_outputs(work, results)


def check_run_outputs(work: str, results: str) -> None:
    """What a finished tiny run leaves on its storage (local or URI), checked through synthaug.storage."""
    out = storage.join(results, "tiny")
    for f in ("metrics.json", "metrics.md", "summary.md", "config.yaml", "fidelity_vs_guidance.png",
              "samples_per_class.png", "closest_pairs.png", "sweep/sweep.csv", "sweep/sweep.parquet",
              "sweep/heatmap.png", "sweep/accuracy_vs_ratio.png", "sweep/summary.md"):
        assert storage.is_file(storage.join(out, f)), f
    m = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    for k in ("real_only_top1_mean", "real_plus_synthetic_top1_mean", "paired_gain_mean", "fid_w2", "isc_mean_w2",
              "kid_mean_w2", "precision_w2", "recall_w2", "cas_top1_mean_w2", "near_copy_share_w2", "seconds_total", "pseudo_label_top1_mean", "pseudo_label_n"):
        assert k in m, k
    assert m["seeds"] == 1 and 0 <= m["near_copy_share_w2"] <= 1
    # Stages talked through contract datasets on the configured storage, each committed by its manifest.
    run = storage.join(work, "tiny")
    assert storage.is_file(storage.join(run, "config.yaml"))
    for split in ("train", "val", "pool", "train_full"):
        d = storage.join(run, "data", split)
        assert is_complete(d) and read_manifest(d)["num_rows"] > 0, split
    gen = read_manifest(storage.join(run, "generators", "finetune"))
    assert gen["base_hash"] == read_manifest(storage.join(run, "generators", "pretrain"))["weights_hash"]
    # Sampled sets are keyed by content, outside the run and outside results.
    samples = storage.list_dirs(storage.join(work, "samples"))
    assert len(samples) == 2 and all(is_complete(storage.join(work, "samples", s)) for s in samples)
    assert read_manifest(storage.join(work, "samples", samples[0]))["num_rows"] > 0
    # Ray Train / Tune checkpoints went to the run's storage too, and none into results.
    assert storage.list_files(storage.join(run, "ray"))
    names = [storage.basename(i.path) for i in storage.list_files(out)]
    assert not [n for n in names if n.endswith(".safetensors")]
    assert not [i.path for i in storage.list_files(out) if "/checkpoint_" in i.path]
    assert "one seed: noise cannot be judged" in storage.read_text(storage.join(out, "summary.md"))
    if storage.is_uri(work):  # nothing of the run leaked onto local disk under a folded "s3:" name
        assert storage.local_path("s3:") is not None and not storage.exists("s3:")
