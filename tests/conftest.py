"""Shared fixtures: one real local Ray for the whole session, and tiny ingested digits."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (started once; settings from synthaug.raylocal)."""
    import ray

    from synthaug.raylocal import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory):
    """Digits ingested in the low-data regime: {'train','val','pool','train_full'} -> dir."""
    from synthaug.config import load_config
    from synthaug.data import ingest

    out = tmp_path_factory.mktemp("digits")
    cfg = load_config(None, ["ingest.k_per_class=10"])
    ingest.run(cfg, out)
    return {k: out / k for k in ("train", "val", "pool", "train_full")}
