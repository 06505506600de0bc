"""Shared fixtures: one real local Ray for the whole session, tiny ingested digits, and a
real S3-compatible server (SeaweedFS on 127.0.0.1) with storage roots on it."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/s3server.py

# Ray's dashboard serves its metrics on a fixed port (44227) by default; a second local
# Ray on the same machine (another test session, or another pytest-xdist worker, each of
# which starts its own Ray) then fails to start. Pick a free one, in each worker.
if "DASHBOARD_METRIC_PORT" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
    import s3server

    os.environ["DASHBOARD_METRIC_PORT"] = str(s3server.free_ports(1)[0])


def _session_uses_s3(session) -> bool:
    return any("s3_server" in getattr(item, "fixturenames", ()) for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def _s3_before_ray(request):
    """When any selected test uses the S3 server, start it before anything else can start Ray,
    so that its ``AWS_*`` variables are in the environment Ray's workers inherit."""
    if _session_uses_s3(request.session):
        request.getfixturevalue("s3_server")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (started once; settings from synthaug.raylocal)."""
    import ray

    from synthaug.raylocal import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS on a free port of 127.0.0.1 with bucket ``synthaug-test``; ``AWS_*`` set while it runs.

    Sets ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
    ``AWS_REGION`` (what :mod:`synthaug.storage` resolves ``s3://`` with), restores them
    afterwards and stops only its own process. ``s3_server.root(name)`` is a fresh
    ``s3://synthaug-test/<name>-<hex>`` location.
    """
    import s3server

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        pytest.fail("s3_server started after Ray: its AWS_* variables would not reach Ray's workers "
                    "(request s3_server before ray_session)")
    srv = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    saved = {k: os.environ.get(k) for k in (*srv.env, "AWS_ENDPOINT_URL_S3")}
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.update(srv.env)
    try:
        yield srv
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_root(s3_server, request) -> str:
    """A fresh, empty ``s3://`` location for one test."""
    return s3_server.root(request.node.originalname or "t")


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path, s3_server) -> str:
    """A fresh, empty location on local disk and on the S3 server (tests run once with each)."""
    if request.param == "local":
        return str(tmp_path / "root")
    return s3_server.root(request.node.originalname or "t")


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory):
    """Digits ingested in the low-data regime: {'train','val','pool','train_full'} -> dir."""
    from synthaug.config import load_config
    from synthaug.data import ingest

    out = tmp_path_factory.mktemp("digits")
    cfg = load_config(None, ["ingest.k_per_class=10"])
    ingest.run(cfg, out)
    return {k: out / k for k in ("train", "val", "pool", "train_full")}


# `make test` runs pytest-xdist with --dist loadfile: each worker takes a whole file at a time,
# in collection order (--no-loadscope-reorder; xdist's default starts the files with the most
# tests first, which left the longest file, minutes of one test, to run alone at the end).
# These files take longest in CI (--durations), longest first; the others follow in name order.
SLOW_FILES_FIRST = ("test_multinode.py", "test_faults.py", "test_error_classes.py", "test_generative.py",
                    "test_study.py", "test_cas_quality.py", "test_families.py", "test_api.py", "test_console.py",
                    "test_jobs.py", "test_pseudolabel.py", "test_cli_errors.py", "test_classify.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def pytest_addoption(parser):
    parser.addoption("--runpipeline", action="store_true", default=False,
                     help="also run the tiny pipeline in this process, on S3 and on a local path (test_pipeline.py)")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (tests/mlflowserver.py); ``.wait()`` returns its URI once it answers."""
    from mlflowserver import MlflowServer

    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def cli_ray(tmp_path_factory):
    """``ray.address=...`` of a Ray head started with the CLI (tests/raycli.py), for tests that run many
    ``synthaug`` commands as subprocesses: each joins it as a user's command joins a cluster, instead
    of starting a local Ray of its own (about 5 s of start-up per command here)."""
    import raycli as R

    from synthaug.config import RayConfig

    head = R.start_head(tmp_path_factory.mktemp("cli_ray") / "head.log", num_cpus=RayConfig().num_cpus)
    try:
        yield f"ray.address={head.address}"
    finally:
        R.stop(head)
