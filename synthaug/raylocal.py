"""Ray start-up and the version-sensitive Ray calls, kept in one place.

Local-Ray settings that avoid known hangs on small machines live here, not in tests:
more logical CPUs than the workers need (Ray Data starves otherwise), the dashboard on
(Train V2 cleans up placement groups through it) and token auth off for a local Ray.

The driver's object-store settings (``AWS_ENDPOINT_URL``, credentials, region) travel to
every worker in the runtime environment, so an ``s3://`` location resolves to the same
storage in the driver, in Ray Data tasks and in Train workers (a pickled pyarrow
``S3FileSystem`` carries its endpoint but takes credentials from where it is unpickled).
"""

from __future__ import annotations

import os

from synthaug import console, storage
from synthaug.config import Config, RayConfig
from synthaug.errors import InputValueError
from synthaug.malloc import TRIM_ENV, interval

# Forwarded to workers when set in the driver (see the module docstring).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


# glibc malloc: workers keep glibc's defaults (one arena per thread, up to 8 per core). A
# cap of 2 arenas (MALLOC_ARENA_MAX=2, tried in 67e5f87) made the classifier task's memory
# grow faster with N (877 -> 1040 MB from 10k to 40k images, against 803 -> 883 with the
# defaults): the prefetch and training threads then share heaps and fragment them. What
# keeps them flat is synthaug.malloc's periodic trim; its interval (TRIM_ENV) travels to the workers.

PARQUET_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster we run under (``ray job submit``), ``cfg.address``, or start a local Ray."""
    import ray

    cfg = cfg or RayConfig()
    interval()  # a bad SYNTHAUG_MALLOC_TRIM_EVERY fails here, before any work, not in a worker
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train V2's controller polls workers every 2 s by default and ray.train.report waits for
    # the poll: ~1.3 s per report measured here, which dominated small runs. 0.2 s: 0.08 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Ray 2.60's DataSourceV2 Parquet reader starts a pool of 32 FooterReader actors (new
    # worker processes) for every execution of a read: measured here 15-35 s per epoch's read
    # of a 4-file dataset against ~1 s with the V1 reader, which does the same work in tasks.
    os.environ.setdefault(PARQUET_V2_ENV, "0")
    # Train V2 patches print() in its workers to log through Train's logger, whose console
    # handler writes the line again when Ray has wrapped the worker's stdout: every
    # `[pretrain] step ...` line reached the driver twice. Plain print: once.
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    keys = ("HF_HUB_OFFLINE", "RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", PARQUET_V2_ENV, PRINT_PATCH_ENV)
    keys += tuple(k for k in (TRIM_ENV, "MALLOC_ARENA_MAX", *STORAGE_ENV) if os.environ.get(k))  # only when set
    console.quiet()
    runtime_env = {"env_vars": {**{k: os.environ[k] for k in keys}, **console.worker_env()}}
    data_context()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ValueError as e:  # the submitted job's runtime env sets the same variables
            if "merge" not in str(e):
                raise
            ray.init(address=address, log_to_driver=True)
        return
    # A Ray started here is one machine, which no cloud preempts: Train's preemption watcher (an
    # actor per run, and an error line from its start on every run's console) is left out.
    # Train passes the variable on to its controller. A cluster joined above keeps its own.
    # Its workers get it too: a classifier trained inside a Tune trial takes its environment from there.
    os.environ.setdefault(PREEMPTION_ENV, "0")
    runtime_env["env_vars"][PREEMPTION_ENV] = os.environ[PREEMPTION_ENV]
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
    )


def check_shared_locations(cfg: Config, nodes: list[dict]) -> None:
    """Refuse a local ``work_dir`` / ``results_dir`` on a cluster of more than one alive node
    (``nodes``: ``ray.nodes()``), unless ``shared_mount`` says every node sees the same mount.

    A path on the driver's disk is another directory, or none, on the other nodes: tasks there
    would write where nobody reads, or fail late. One line, before any work.
    """
    alive = sum(1 for n in nodes if n.get("Alive"))
    if alive <= 1 or cfg.shared_mount:
        return
    for key in ("work_dir", "results_dir"):
        value = getattr(cfg, key)
        if not storage.is_uri(value):
            raise InputValueError(
                f"config key '{key}': {value} is a local path, but the Ray cluster has {alive} nodes that do not "
                f"share this machine's disk; use an s3:// (or gs://) URI, or a mount every node sees with "
                f"shared_mount=true")


def check_cluster(cfg: Config) -> None:
    """:func:`check_shared_locations` against the cluster the stage will run on: joined now when
    it is a running one (``ray.address``, ``RAY_ADDRESS``, or already joined); a local Ray that
    synthaug starts is one node, so nothing is started for that."""
    import ray

    if not (ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return
    init_ray(cfg.ray)
    check_shared_locations(cfg, ray.nodes())


def data_context() -> None:
    """This process's Ray Data context, set as the workers' env sets theirs (see init_ray); a process
    that makes datasets of its own (a Tune trial) calls it too."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = console.progress_bars()  # datasets carry this context to the workers
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = os.environ.get(PARQUET_V2_ENV, "0") not in ("0", "false", "False")


def use_assigned_cpus() -> int:
    """torch threads = the CPUs Ray gave this task or actor (1 for a fraction or none; unchanged outside Ray).

    Ray sets ``OMP_NUM_THREADS`` from them only once per worker process, before torch may have been
    imported by an earlier task of another size; this sets torch's pool itself. Returns the count.
    """
    import math

    import ray
    import torch

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return torch.get_num_threads()
    cpus = max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU") or 1))
    torch.set_num_threads(cpus)
    return cpus


def _concurrency_api() -> bool:
    """Whether this Ray's ``map_batches`` takes ``concurrency=`` (2.9-2.50) rather than ``compute=``.

    From 2.51 ``concurrency`` is deprecated in favour of ``compute=ActorPoolStrategy(...)`` /
    ``TaskPoolStrategy(...)``, which older versions (< 2.9) also used.
    """
    import ray

    major, minor = (int(x) for x in ray.__version__.split(".")[:2])
    return (2, 9) <= (major, minor) < (2, 51)


def actor_pool_kwargs(min_size: int, max_size: int, num_gpus: float = 0.0) -> dict:
    """``map_batches`` kwargs for an autoscaling actor pool (the API moved between versions)."""
    from ray.data import ActorPoolStrategy

    kwargs: dict = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": 1}
    if _concurrency_api():  # pragma: no cover - older Ray
        kwargs["concurrency"] = (min_size, max_size) if min_size != max_size else min_size
    else:
        kwargs["compute"] = ActorPoolStrategy(min_size=min_size, max_size=max_size)
    return kwargs


# A Ray Data map over at most this many rows, with no GPU, runs in pooled Ray tasks rather
# than a fresh actor pool: an actor is a new process that imports torch and builds its model
# (seconds of CPU) for each pass, which is most of the work on a small set; a pooled task
# worker keeps both for the next pass (see map_pool_kwargs).
SMALL_MAP_ROWS = 4096

_CACHED: dict = {}  # this worker process's one (key -> instance) of map_pool_kwargs' task form


def _call_cached(batch, cls, ctor_kwargs: dict, key: str):
    """Run ``cls(**ctor_kwargs)(batch)``, building the instance once per worker process (one kept);
    ``key`` names ``(cls, ctor_kwargs)``, hashed once in the driver (:func:`map_pool_kwargs`).

    torch's threads are set to this task's CPUs first: an earlier task of another size may
    have left the pooled process with more (and float sums that differ with the thread count).
    """
    use_assigned_cpus()
    inst = _CACHED.get(key)
    if inst is None:
        _CACHED.clear()  # one model per process: what an idle worker holds stays bounded
        inst = _CACHED[key] = cls(**ctor_kwargs)
    return inst(batch)


def map_pool_kwargs(cls, ctor_kwargs: dict, *, rows: int, min_size: int, max_size: int, num_gpus: float = 0.0) -> dict:
    """``map_batches`` kwargs (``fn`` included) that map batches through ``cls(**ctor_kwargs)``.

    A GPU, or more than :data:`SMALL_MAP_ROWS` rows: an autoscaling actor pool of ``min_size``
    to ``max_size`` actors, each building ``cls`` once. Otherwise at most ``max_size`` Ray
    tasks at a time, in Ray's pooled worker processes, each process building ``cls`` once and
    keeping it for later passes with the same arguments. ``cls.__call__`` must be a pure
    function of the batch (as every synthaug map actor's is), so both forms give the same rows.
    """
    if num_gpus or rows > SMALL_MAP_ROWS:
        return {"fn": cls, "fn_constructor_kwargs": ctor_kwargs, **actor_pool_kwargs(min_size, max_size, num_gpus)}
    import hashlib

    from ray import cloudpickle
    from ray.data import TaskPoolStrategy

    key = f"{cls.__module__}.{cls.__qualname__}:{hashlib.sha256(cloudpickle.dumps(ctor_kwargs)).hexdigest()}"
    kwargs: dict = {"fn": _call_cached, "fn_kwargs": {"cls": cls, "ctor_kwargs": ctor_kwargs, "key": key}, "num_cpus": 1}
    if _concurrency_api():  # pragma: no cover - older Ray
        kwargs["concurrency"] = max_size
    else:
        kwargs["compute"] = TaskPoolStrategy(size=max_size)
    return kwargs
