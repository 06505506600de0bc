"""The whole default pipeline, tiny, through the CLI a user calls (one real local Ray)."""

from __future__ import annotations

import json

from synthaug.artifacts import read_manifest
from synthaug.cli import main


def test_tiny_pipeline_end_to_end(ray_session, tmp_path):
    work, results = tmp_path / "runs", tmp_path / "results"
    rc = main(["run", "--config", "jobs/configs/tiny.yaml", f"work_dir={work}", f"results_dir={results}"])
    assert rc == 0
    out = results / "tiny"
    for f in ("metrics.json", "metrics.md", "summary.md", "config.yaml", "fidelity_vs_guidance.png",
              "samples_per_class.png", "closest_pairs.png", "sweep/sweep.csv", "sweep/sweep.parquet",
              "sweep/heatmap.png", "sweep/accuracy_vs_ratio.png", "sweep/summary.md"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    for k in ("real_only_top1_mean", "real_plus_synthetic_top1_mean", "paired_gain_mean", "fid_w2", "isc_mean_w2",
              "kid_mean_w2", "precision_w2", "recall_w2", "cas_top1_mean_w2", "near_copy_share_w2", "seconds_total"):
        assert k in m, k
    assert m["seeds"] == 1 and 0 <= m["near_copy_share_w2"] <= 1
    # Stages talked through contract datasets; sampled sets are keyed by content, outside results/.
    gen = read_manifest(work / "tiny" / "generators" / "finetune")
    assert gen["base_hash"] == read_manifest(work / "tiny" / "generators" / "pretrain")["weights_hash"]
    samples = sorted((work / "samples").iterdir())
    assert len(samples) == 2 and all((s / "manifest.json").is_file() for s in samples)
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("checkpoint_*"))
    assert "one seed: noise cannot be judged" in (out / "summary.md").read_text()
