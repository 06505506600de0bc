"""Classification Accuracy Score: train on synthetic only, test on the real val split.

CAS uses the project's classifier trainer (Ray Train) with the same recipe as real-only
training -- the same model, epochs and optimiser steps: an epoch is ``|real train|``
images, so CAS and real-only see the same number of images. Datasets are passed by
location: the mixture (every synthetic row, ``synthetic_only``) is planned from the
manifests and streamed by the workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthaug.artifacts import read_manifest
from synthaug.classify.mixing import plan_mixture
from synthaug.stats import mean_std
from synthaug.config import ClassifyConfig, RayConfig, replace


def cas(cfg: ClassifyConfig, synthetic_dir: str | Path, val_dir: str | Path, real_train_dir: str | Path,
        out_dir: str | Path, *, ray_cfg: RayConfig | None = None, name: str = "cas") -> dict:
    """CAS top-1/top-5 (mean and std over ``cfg.seeds``) and per-class top-1 (mean over seeds)."""
    from synthaug.classify.train import fit

    m = read_manifest(synthetic_dir)
    same_recipe = replace(cfg, epoch_images=cfg.epoch_images or int(read_manifest(real_train_dir)["num_rows"]))
    runs = []
    for seed in cfg.seeds:
        train = plan_mixture(str(real_train_dir), str(synthetic_dir), ratio=0.0, seed=int(seed), synthetic_only=True)
        runs.append(fit(same_recipe, train, val_dir, seed=int(seed), out_dir=out_dir, name=f"{name}-seed{seed}",
                        class_names=m["class_names"], in_chans=int(m["channels"]), ray_cfg=ray_cfg))
    (top1, top1_sd), (top5, top5_sd) = (mean_std(r[k] for r in runs) for k in ("top1", "top5"))
    per_class = np.mean([r["per_class_top1"] for r in runs], axis=0)
    return {
        "cas_top1_mean": top1, "cas_top1_std": top1_sd, "cas_top5_mean": top5, "cas_top5_std": top5_sd,
        "cas_seeds": len(runs), "cas_n_train": int(runs[0]["n_train"]),
        "cas_per_class_top1": {c: float(v) for c, v in zip(m["class_names"], per_class)},
    }
