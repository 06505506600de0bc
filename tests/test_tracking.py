"""Experiment tracking against a real MLflow server (``mlflow server`` on 127.0.0.1) and real
TensorBoard event files, on a tiny run of real stages: a generator (fine-tune), a classifier
(the teacher, a Ray task) and the sweep (one Tune trial).

The server (``tests/mlflowserver.py``, one per session: ``conftest.mlflow_server``) is waited
on only when the test needs it, so its start-up (tens of seconds of imports on a busy
machine) overlaps the Ray start and the ingest. It is stopped by its process group (ours, by its PID).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthaug import tracking
from synthaug.config import load_config
from synthaug.pipeline import RunPaths, Timer, stage_finetune, stage_ingest, stage_teacher

# The cheapest run that still trains both kinds of model and a Tune trial.
TINY = ["ingest.k_per_class=5", "finetune.steps=4", "finetune.batch_size=16", "finetune.checkpoint_every=4",
        "finetune.val_grid_every=4", "finetune.cache=false", "classify.epochs=2", "classify.seeds=[0]",
        "classify.augment=false", "classify.cache=true", "sweep.guidance_scales=[1.0]", "sweep.ratios=[0.0]",
        "sweep.max_concurrent=1", "tracking.log_every=1"]


def _runs(client, experiment: str) -> list:
    """Every run of the experiment."""
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _named(runs: list, name: str):
    (run,) = [r for r in runs if r.info.run_name == name]
    return run


def _children(runs: list, parent) -> dict:
    """The runs nested in ``parent``, by name."""
    return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def _scalars(logdir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_run_is_tracked_in_mlflow_and_tensorboard(tmp_path, mlflow_server, ray_session):
    """Parent run -> a child per stage -> a child per classifier run and per Tune trial; params,
    per-step metrics from Ray workers, artifacts; a second run reuses by key and only tags it."""
    from mlflow import MlflowClient

    from synthaug.sweep import run_sweep

    base = [f"work_dir={tmp_path}/runs", f"results_dir={tmp_path}/results", "name=tr", *TINY]
    cfg = load_config("jobs/configs/tiny.yaml", [*base, "tracking.mlflow_uri=http://127.0.0.1:1"])  # refused below
    stage_ingest(cfg)  # untracked, while the server starts
    with pytest.raises(Exception, match="tracking.mlflow_uri"):
        with tracking.run(cfg, "run"):
            pass
    cfg = load_config("jobs/configs/tiny.yaml", [*base, f"tracking.mlflow_uri={mlflow_server.wait()}",
                                                 "tracking.experiment=t-tracking"])
    p = RunPaths(cfg)
    with tracking.run(cfg, "run"):
        timer = Timer()
        timer("ingest", stage_ingest, cfg)
        timer("finetune", stage_finetune, cfg)
        timer("teacher", stage_teacher, cfg)
        timer("sweep", run_sweep, cfg, p.data("train"), p.data("val"), {}, f"{p.results}/sweep", storage_dir=p.ray)
        tracking.artifacts(p.results)

    client = MlflowClient(cfg.tracking.mlflow_uri)
    runs = _runs(client, "t-tracking")
    parent = _named(runs, "tr run")
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.params["finetune.steps"] == "4" and parent.data.params["classify.epochs"] == "2"
    stages = _children(runs, parent)
    assert set(stages) == {"ingest", "finetune", "teacher", "sweep"}
    assert all(r.info.status == "FINISHED" for r in stages.values())

    # The fine-tune child: its section as params, the worker's loss per step, final numbers, the val grid.
    ft = stages["finetune"]
    assert ft.data.params["finetune.steps"] == "4" and "classify.epochs" not in ft.data.params
    loss = client.get_metric_history(ft.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4] and all(m.value > 0 for m in loss)
    assert [m.step for m in client.get_metric_history(ft.info.run_id, "images_per_s")]
    assert ft.data.metrics["steps"] == 4 and ft.data.metrics["seconds"] > 0
    assert [a.path for a in client.list_artifacts(ft.info.run_id, "val_grids")] == ["val_grids/step_000004.png"]

    # The teacher: one classifier run nested in its stage, train loss and top-1 per epoch from the Ray task.
    (name, clf), = _children(runs, stages["teacher"]).items()
    assert name.startswith("r0-mix-seed0-") and clf.data.params["seed"] == "0" and clf.data.tags["synthaug.key"]
    assert sorted(m.step for m in client.get_metric_history(clf.info.run_id, "train_loss")) == [1, 2]
    top1 = client.get_metric_history(clf.info.run_id, "top1")
    assert len(top1) == 2 and all(0 <= m.value <= 100 for m in top1)
    assert clf.data.metrics["final/top1"] == top1[-1].value

    # The sweep: one Tune trial (real only, seed 0), nested through Ray's setup_mlflow.
    (tname, trial), = _children(runs, stages["sweep"]).items()
    assert tname.startswith("trial-") and "real only" in tname and trial.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, "top1")) == [1, 2]

    # Artifacts of the parent: the sweep's table and summary from the results dir.
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/summary.md", "sweep/heatmap.png"} <= names

    # TensorBoard: the same per-step loss and per-epoch top-1, read back from the event files.
    (tb,) = (Path(p.work) / "tensorboard").glob("run-*")
    assert [s for s, _ in _scalars(tb / "finetune", "loss")] == [1, 2, 3, 4]
    (clf_tb,) = [d for d in (tb / "teacher").iterdir() if d.is_dir()]
    assert len(_scalars(clf_tb, "top1")) == 2 and _scalars(tb / "teacher", "seconds")

    # A second run reuses the export and the classifier by key: tags name them, nothing is trained or copied.
    with tracking.run(cfg, "again"):
        timer = Timer()
        timer("finetune", stage_finetune, cfg)
        timer("teacher", stage_teacher, cfg)
    runs = _runs(client, "t-tracking")
    again = _children(runs, _named(runs, "tr again"))
    ft2, t2 = again["finetune"], again["teacher"]
    assert ft2.data.tags["synthaug.reused"] == "true" and len(ft2.data.tags["synthaug.reused.finetune"]) == 64
    assert ft2.data.tags["synthaug.reused.finetune.location"].endswith("generators/finetune")
    assert not client.get_metric_history(ft2.info.run_id, "loss") and not client.list_artifacts(ft2.info.run_id)
    assert t2.data.tags["synthaug.reused"] == "true" and not _children(runs, t2)
    assert t2.data.tags[f"synthaug.reused.{name}"] == clf.data.tags["synthaug.key"]


def test_nothing_is_tracked_without_uri_and_tensorboard(tmp_path):
    """Defaults: TensorBoard only, and nothing of MLflow is imported; both off: no scope at all."""
    code = f"""
import sys
from pathlib import Path
from synthaug import tracking
from synthaug.config import load_config
cfg = load_config(None, ["work_dir={tmp_path}/w", "name=n"])
with tracking.run(cfg, "run") as s:
    assert s.uri == "" and s.run_id is None
    with tracking.stage("finetune", cfg):
        log = tracking.StepLogger(tracking.handle())
        log.log({{"loss": 0.5}}, 1)
        log.close()
        tracking.reused("finetune", "k" * 64, "x")
        tracking.final({{"loss": 0.25}})
assert "mlflow" not in sys.modules, "mlflow was imported without tracking.mlflow_uri"
assert len(list(Path("{tmp_path}/w/n/tensorboard").glob("run-*/finetune/events.out.tfevents.*"))) == 2
off = load_config(None, ["work_dir={tmp_path}/off", "tracking.tensorboard=false"])
with tracking.run(off, "run") as s:
    assert s is None and tracking.handle() is None
    with tracking.stage("ingest", off) as st:
        assert st is None
assert not Path("{tmp_path}/off").exists()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "ok", out.stderr[-3000:]
    assert "[tracking] TensorBoard: tensorboard --logdir" in out.stdout and "MLflow" not in out.stdout


def test_tracking_config_is_checked():
    from synthaug.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        load_config(None, ["tracking.mlflow_uri=localhost:5000"])
    with pytest.raises(ConfigError, match="tracking.log_every"):
        load_config(None, ["tracking.log_every=0"])
    assert tracking.numbers(({"a": 1, "b": float("nan"), "c": {"d": 2}, "config": {"e": 3}}, "x")) == {"a": 1.0, "c.d": 2.0}


def test_tensorboard_files_reach_an_object_store(s3_root, tmp_path):
    """A worker's event files for an ``s3://`` run are written locally and uploaded when the writer closes."""
    from synthaug import storage

    loc = storage.join(s3_root, "tb")
    log = tracking.StepLogger({"uri": "", "run_id": None, "tb_dir": loc, "log_every": 1})
    for step in (1, 2, 3):
        log.log({"loss": 1.0 / step}, step)
    assert not storage.exists(loc)  # nothing before close
    log.close()
    (f,) = storage.list_files(loc)
    assert "tfevents" in f.path
    local = storage.download_dir(loc, tmp_path / "tb")
    assert _scalars(local, "loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
