"""Settings every Ray worker starts with (synthaug.raylocal.init_ray's runtime env)."""

from __future__ import annotations

import os


def test_workers_start_with_the_malloc_settings(ray_session):
    """glibc reads MALLOC_* once, when a process starts: they must reach every worker through
    the runtime env (a value already set in the driver wins)."""
    from synthaug.raylocal import MALLOC_ENV

    getenv = ray_session.remote(os.getenv)  # by reference: a worker imports os, not this test module
    got = {k: ray_session.get(getenv.remote(k)) for k in MALLOC_ENV}
    assert got == {k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}
    assert all(got.values())
