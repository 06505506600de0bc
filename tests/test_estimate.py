"""``synthaug estimate``: the table for the ImageNet config, FLOP counts against published
figures, and the measured path from a GPU benchmark JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from synthaug.config import load_config
from synthaug.estimate import estimate, gflops

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT / "jobs" / "configs" / "imagenet.yaml"
STAGES = ("fine-tune", "sample", "extractor", "FID@50K", "classifier resnet50 real only",
          "classifier resnet50 1:1", "CAS")


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("stage", "---") and not cells[0].startswith("-"):
            rows[cells[0]] = cells
    return rows


def _num(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell))


@pytest.mark.parametrize("gpus", [8, 64])
def test_estimate_prints_every_stage(gpus, capsys):
    from synthaug.cli import main

    assert main(["estimate", "--config", str(IMAGENET), "--gpus", str(gpus), "--gpu-type", "h100",
                 "--bench-dir", str(ROOT / "results" / "bench")]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    for stage in STAGES:
        row = next((r for name, r in rows.items() if name.startswith(stage)), None)
        assert row is not None, f"no row for {stage!r} in\n{out}"
        images, gpu_hours = _num(row[1]), _num(row[5])
        assert images > 0 and gpu_hours > 0, row
        # No GPU benchmark has been recorded in results/bench yet: every row is a FLOP estimate.
        assert row[3] == "FLOP estimate", row
    total = rows["**total**"]
    assert _num(total[5]) > 0 and f"wall @ {gpus}x H100" in out and "MFU" in out


def test_flop_counts_match_published_figures():
    # DiT-XL/2 at 256: 118.6 GFLOPs in the DiT paper (multiply-adds) -> 2x as FLOPs.
    assert gflops("dit-xl-2", 256) == pytest.approx(2 * 118.6, rel=0.02)
    # ResNet-50 at 224: 4.1 GMACs (timm / torchvision model cards); more pixels, more FLOPs.
    assert gflops("resnet50", 224) == pytest.approx(2 * 4.1, rel=0.02)
    assert gflops("resnet50", 256) == pytest.approx(gflops("resnet50", 224) * (256 / 224) ** 2, rel=0.05)
    # Inception-v3 at 299: 5.7 GMACs.
    assert gflops("inception-v3", 299) == pytest.approx(2 * 5.7, rel=0.03)


def test_measured_figure_replaces_the_flop_estimate(tmp_path):
    cfg = load_config(IMAGENET)
    bench = {"benchmark": "sample", "mode": "gpu", "gpu_throughput": [
        {"stage": "sample", "model": "sd-unet", "image_size": 256, "images_per_s": 12.5, "device_name": "NVIDIA H100 80GB HBM3"},
        {"stage": "sample", "model": "sd-unet", "image_size": 256, "images_per_s": 99.0, "device_name": "NVIDIA A100-SXM4-80GB"},
    ]}
    (tmp_path / "sample.json").write_text(json.dumps(bench))
    rows = {r.stage.split()[0]: r for r in estimate(cfg, "h100", bench_dir=tmp_path)}
    assert rows["sample"].source == "measured (NVIDIA H100 80GB HBM3)"
    assert rows["sample"].gpu_hours == pytest.approx(1_200_000 / 12.5 / 3600)
    assert rows["fine-tune"].source == "FLOP estimate"
    # Another GPU type does not borrow the H100's figure.
    assert estimate(cfg, "l4", bench_dir=tmp_path)[1].source == "FLOP estimate"
    # A sampling figure measured with other steps is not this config's.
    bench["gpu_throughput"][0].update(sampler=cfg.sample.sampler, steps=cfg.sample.steps * 2, cfg_passes=2)
    (tmp_path / "sample.json").write_text(json.dumps(bench))
    assert estimate(cfg, "h100", bench_dir=tmp_path)[1].source == "FLOP estimate"
    bench["gpu_throughput"][0]["steps"] = cfg.sample.steps
    (tmp_path / "sample.json").write_text(json.dumps(bench))
    assert estimate(cfg, "h100", bench_dir=tmp_path)[1].source == "measured (NVIDIA H100 80GB HBM3)"


def test_unknown_gpu_type_is_refused(capsys):
    from synthaug.cli import main

    with pytest.raises(SystemExit):
        main(["estimate", "--config", str(IMAGENET), "--gpu-type", "tpu"])
    assert "invalid choice" in capsys.readouterr().err
