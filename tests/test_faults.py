"""Fault injection on the real local Ray: SIGKILL a worker process mid-run, the run must still finish.

No mocks: a watcher thread waits until a run has made durable progress (a checkpoint in
storage, or a written shard), then SIGKILLs one Ray worker process of that run, as an
OOM killer or a lost node would. Only processes of the Ray instance this pytest session
started are candidates: descendants of *our* raylet whose environment names that raylet
(other developers' Ray instances may share the machine).

* Generator fine-tune (Ray Train, 2 DDP workers): the worker group restarts from the
  latest checkpoint, skips consumed plan batches and ends at exactly ``steps``.
* Sampling (Ray Data actor pool): the killed actor is restarted and its batch retried;
  the set has exactly N per class, unique ids, and the images of an uninterrupted run.
* Classifier (Ray Train, 2 workers): resumes from the last epoch checkpoint and reports
  the configured number of epochs.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

psutil = pytest.importorskip("psutil")

from synthaug.artifacts import DATA_DIR, read_manifest, read_table  # noqa: E402
from synthaug.config import ClassifyConfig, load_config  # noqa: E402
from synthaug.generative import finetune, models, sample  # noqa: E402

TRAIN_WORKER = "ray::RayTrainWorker"  # process title of a Ray Train (V2) worker actor
MAP_WORKER = "ray::MapWorker"  # process title of a Ray Data actor-pool worker (MapWorker(MapBatches(Sampler)))


# ----------------------------------------------------------------------------- process helpers


def _our_raylet() -> psutil.Process:
    """The raylet of the Ray instance this session started (skip when we only joined one)."""
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    procs = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET) if node is not None else None
    if not procs:
        pytest.skip("Ray was not started by this test session; refusing to kill processes of another instance")
    return psutil.Process(procs[0].process.pid)


def _our_workers(raylet: psutil.Process, title: str) -> list[psutil.Process]:
    """Live descendants of our raylet whose process title starts with ``title``."""
    found = []
    for p in raylet.children(recursive=True):
        try:
            cmd = p.cmdline()
            if not cmd or not cmd[0].startswith(title) or p.status() == psutil.STATUS_ZOMBIE:
                continue
            # Belt and braces: Ray hands each worker its raylet's pid.
            if p.environ().get("RAY_RAYLET_PID") != str(raylet.pid):
                continue
            found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Killer(threading.Thread):
    """Waits until ``ready()`` and a worker titled ``title`` exists, then SIGKILLs that worker once.

    ``progress()`` is recorded just before the kill, so a test can check that the kill
    landed mid-run rather than after the work was done.
    """

    def __init__(self, title: str, ready: Callable[[], bool], progress: Callable[[], int], timeout: float = 1800.0):
        super().__init__(daemon=True)
        self.title, self.ready, self.progress, self.timeout = title, ready, progress, timeout
        self.raylet = _our_raylet()
        self.killed_pid: int | None = None
        self.progress_at_kill: int | None = None
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            while not self._halt.is_set() and time.monotonic() < deadline:
                if self._safe(self.ready):
                    victims = _our_workers(self.raylet, self.title)
                    if victims:
                        self.progress_at_kill = self._safe(self.progress)
                        victims[0].send_signal(signal.SIGKILL)
                        self.killed_pid = victims[0].pid
                        return
                time.sleep(0.05)
        except BaseException as e:  # surfaced by the test
            self.error = e

    @staticmethod
    def _safe(fn):
        try:
            return fn()
        except Exception:  # a file being written while we read it; try again next poll
            return None


def _committed(run_dir: Path, key: str) -> int:
    """``key`` of the newest checkpoint the Train controller has registered (0 when none).

    A checkpoint directory in storage is not enough: until the controller has registered
    it (in its snapshot), a restarted worker group does not resume from it.
    """
    snap = run_dir / "checkpoint_manager_snapshot.json"
    latest = json.loads(snap.read_text()).get("latest_checkpoint_result") if snap.is_file() else None
    return int(latest["metrics"][key]) if latest else 0


def _assert_killed(killer: Killer) -> None:
    assert killer.error is None, killer.error
    assert killer.killed_pid is not None, f"no {killer.title} process was killed (run ended before the fault?)"
    assert not psutil.pid_exists(killer.killed_pid) or psutil.Process(killer.killed_pid).status() == psutil.STATUS_ZOMBIE


# ----------------------------------------------------------------------------- generator fine-tune


def test_finetune_survives_killed_train_worker(ray_session, digits_dirs, tmp_path):
    import ray.train

    steps = 40
    cfg = load_config(None, [f"finetune.steps={steps}", "finetune.batch_size=16", "finetune.checkpoint_every=10",
                             "finetune.num_workers=2", "finetune.max_failures=2", f"work_dir={tmp_path}/work"])
    storage = tmp_path / "ray"
    runs = lambda: list(storage.glob("finetune-*"))  # noqa: E731  (the run is finetune-<key>)
    progress = lambda: max([_committed(d, "step") for d in runs()], default=0)  # noqa: E731
    killer = Killer(TRAIN_WORKER, ready=lambda: progress() > 0, progress=progress)
    killer.start()
    try:
        m = finetune.run(cfg, "finetune", digits_dirs["train"], tmp_path / "gen", storage)
    finally:
        killer.stop()
    _assert_killed(killer)

    # Killed after the first checkpoint and before the last one.
    assert killer.progress_at_kill is not None and 0 < killer.progress_at_kill < steps, killer.progress_at_kill
    # Exact step count, and the export loads.
    assert m["steps"] == steps and m["resumed_from"] == 0
    gen = models.load_generator(tmp_path / "gen", require_manifest=True)
    assert gen.class_names == [str(i) for i in range(10)]
    (run_dir,) = runs()
    assert finetune.latest_step(run_dir) == steps
    # The restarted worker group resumed from a checkpoint rather than starting over.
    final = ray.train.Result.from_path(str(run_dir)).metrics
    assert final["step"] == steps and final["start_step"] > 0, final
    # And ended with exactly the weights of an undisturbed run (per-step seeded noise, restored
    # state, the data stream skipped to the checkpoint's step).
    undisturbed = finetune.run(cfg, "finetune", digits_dirs["train"], tmp_path / "gen2", tmp_path / "ray2")
    assert undisturbed["resumed_from"] == 0 and undisturbed["weights_hash"] == m["weights_hash"]


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    """An untrained tiny generator export: enough to make sampling cost something."""
    out = tmp_path_factory.mktemp("faultgen") / "gen"
    models.save_generator(models.new_generator("unet", "tiny", [str(i) for i in range(10)], 8, 1), out,
                          {"stage": "test", "steps": 0})
    return out


def _images(d: Path) -> dict:
    t = read_table(d).sort_by("id")
    return dict(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))


def _rows_written(out: Path) -> int:
    """Rows in the chunk shards written so far (each appears whole: ``write_shard`` is atomic)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in (out / DATA_DIR).glob("*/chunk-*.parquet"))


def test_sampling_survives_killed_actor(ray_session, generator_dir, tmp_path, monkeypatch):
    """The reference set is sampled in pooled tasks (a set this small), the killed run in an actor
    pool: the same pixels either way, and after the kill."""
    from synthaug import raylocal

    per_class = 4
    cfg = load_config(None, [f"sample.per_class={per_class}", "sample.steps=40", "sample.batch_size=4",
                             "sample.min_actors=1", "sample.max_actors=1", f"work_dir={tmp_path}/work"])
    reference, _ = sample.run(cfg, generator_dir, tmp_path / "reference")

    monkeypatch.setattr(raylocal, "SMALL_MAP_ROWS", 0)  # an actor pool, whose process is killed
    out = tmp_path / "faulty"
    killer = Killer(MAP_WORKER, ready=lambda: _rows_written(out) > 0, progress=lambda: _rows_written(out))
    killer.start()
    try:
        out, m = sample.run(cfg, generator_dir, out)
    finally:
        killer.stop()
    _assert_killed(killer)

    total = 10 * per_class
    assert killer.progress_at_kill is not None and 0 < killer.progress_at_kill < total, killer.progress_at_kill
    # Exactly N per class, unique ids, and the same pixels as the uninterrupted run.
    assert m["num_rows"] == total and set(m["counts"].values()) == {per_class}
    ids = read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == total
    assert _images(out) == _images(reference)
    assert read_manifest(out)["sample_key"] == read_manifest(reference)["sample_key"]
    assert m["content_hash"] == read_manifest(reference)["content_hash"] and len(m["shards"]) == 10


# ----------------------------------------------------------------------------- classifier


def test_classifier_survives_killed_train_worker(ray_session, digits_dirs, tmp_path):
    """Two Ray Train workers, one killed after a checkpoint: the run resumes and finishes.

    Pins the documented gap (docs/identity.md, "More than one Train worker"): the resumed run
    does not repeat an undisturbed one to the bit, as a one-worker run does. Under Ray Train the
    count of the train set's executions, which seeds each epoch's file order, lives in Train's
    split coordinator; a restarted worker group gets a new coordinator counting from 0, and
    Ray offers no supported way to restore it, so no checkpoint carries it. (Two undisturbed
    two-worker runs do agree to the bit.) If this starts to hold exactly, update the docs.
    """
    import math

    from synthaug.classify.train import fit

    epochs = 12
    cfg = dataclasses.replace(ClassifyConfig(), epochs=epochs, batch_size=16, num_workers=2, checkpoint_every=1,
                              max_failures=1)
    train = str(digits_dirs["train"])  # a location: the workers stream its shards
    names = read_manifest(digits_dirs["train"])["class_names"]
    runs = tmp_path / "runs"  # the run is runs/faulty-<key>

    progress = lambda: max([_committed(d, "epochs") for d in runs.glob("faulty-*")], default=0)  # noqa: E731
    killer = Killer(TRAIN_WORKER, ready=lambda: progress() > 0, progress=progress)
    killer.start()
    try:
        result = fit(cfg, train, digits_dirs["val"], seed=0, out_dir=tmp_path / "runs", name="faulty",
                     class_names=names, in_chans=1)
    finally:
        killer.stop()
    _assert_killed(killer)

    assert killer.progress_at_kill is not None and 0 < killer.progress_at_kill < epochs, killer.progress_at_kill
    assert result["epochs"] == epochs
    assert result["start_epoch"] > 0, result  # resumed from a checkpoint, not from scratch

    # The pinned gap: no execution count in the checkpoint; the resumed run's figures are
    # finite and learnt, but not those of an undisturbed run.
    import torch

    states = sorted(runs.glob("faulty-*/checkpoint_*/state.pt"))
    assert states, list(runs.rglob("*"))[:20]
    state = torch.load(states[-1], weights_only=False)
    assert "epoch" in state and "data_executions" not in state, sorted(state)
    assert all(math.isfinite(result[k]) for k in ("top1", "top5", "train_loss")), result
    assert result["top1"] > 50.0, result  # chance is 10%
    clean = fit(cfg, train, digits_dirs["val"], seed=0, out_dir=tmp_path / "clean", name="clean", class_names=names,
                in_chans=1)
    assert clean["start_epoch"] == 0 and clean["epochs"] == epochs
    assert result["train_loss"] != clean["train_loss"], (result, clean)


def test_one_worker_classifier_survives_killed_task(ray_session, digits_dirs, tmp_path):
    """One worker runs as a plain Ray task (``classify.train._fit_task``): killed after a
    checkpoint, the task is run again, resumes from the checkpoint in the run's storage and
    finishes with the metrics of an undisturbed run, to the bit: the checkpoint carries the
    count of the train set's executions, which seeds each epoch's file order. (Under Ray
    Train, with more workers, the count lives in Train's split coordinator and restarts.)"""
    from synthaug.checkpoints import TaskCheckpoints
    from synthaug.classify.train import fit

    epochs = 8
    cfg = dataclasses.replace(ClassifyConfig(), epochs=epochs, batch_size=16, checkpoint_every=1, max_failures=1)
    train, names = str(digits_dirs["train"]), read_manifest(digits_dirs["train"])["class_names"]
    kw = dict(seed=0, class_names=names, in_chans=1)
    runs = tmp_path / "runs"

    def progress():
        return max([int(TaskCheckpoints(str(d)).latest_metrics().get("epoch", 0)) for d in runs.glob("faulty-*")], default=0)

    killer = Killer("ray::classify", ready=lambda: progress() > 0, progress=progress)
    killer.start()
    try:
        result = fit(cfg, train, digits_dirs["val"], out_dir=runs, name="faulty", **kw)
    finally:
        killer.stop()
    _assert_killed(killer)
    assert killer.progress_at_kill is not None and 0 < killer.progress_at_kill < epochs, killer.progress_at_kill
    assert result["epochs"] == epochs and result["start_epoch"] > 0, result  # resumed, not started over
    assert result["top1"] > 50.0, result  # chance is 10%
    # The finished run is found by its key and returned without another task.
    assert fit(cfg, train, digits_dirs["val"], out_dir=runs, name="faulty", **kw) == result
    clean = fit(cfg, train, digits_dirs["val"], out_dir=tmp_path / "clean", name="clean", **kw)
    assert clean["start_epoch"] == 0
    same = ("top1", "top5", "train_loss", "per_class_top1", "epochs")
    assert {k: result[k] for k in same} == {k: clean[k] for k in same}
