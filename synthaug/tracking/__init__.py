"""Experiment tracking: MLflow runs and TensorBoard event files, behind a few calls the stages make.

Scopes nest like the work: :func:`run` opens the parent of one command (``synthaug run``,
``study`` or a single stage), :func:`stage` a child per stage (``pipeline.Timer`` opens
it), :func:`open_run` / :func:`close_run` a child per trained classifier, and
:func:`trial` a Tune trial's run (Ray's ``setup_mlflow``, nested by the
``mlflow.parentRunId`` tag). MLflow runs exist only when ``tracking.mlflow_uri`` is set
(nothing here imports mlflow otherwise); TensorBoard event files go to
``<work_dir>/<name>/tensorboard/<command>-<time>/<stage>/...`` unless
``tracking.tensorboard`` is false. With neither, every call is a no-op.

Workers (Ray Train, a Ray task, a Tune trial) get a :func:`handle`: a plain dict with
the tracking URI, the run id and the TensorBoard location, passed in the loop config, so
it works on a cluster; there :class:`StepLogger` logs rank 0's metrics per step or epoch.
Reuse by content key logs the reused artifact's key and location as tags (:func:`reused`),
never a second copy. A tracking server that stops answering mid-run costs a warning, not
the run. The MLflow calls live in :mod:`.mlflow_runs`, the TensorBoard writer in
:mod:`.events` and the logged values' shaping in :mod:`.values`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from synthaug import storage
from synthaug.tracking.events import _Events
from synthaug.tracking.mlflow_runs import _client, _create_run, _experiment, _metrics, _quiet, _send, _warn
from synthaug.tracking.values import STAGE_SECTIONS, _dirname, _params, clean_key, flatten, numbers

__all__ = ["PARENT_TAG", "STAGE_SECTIONS", "Scope", "StepLogger", "artifacts", "clean_key", "close_run", "current",
           "final", "flatten", "handle", "numbers", "open_run", "reused", "run", "stage", "trial"]

PARENT_TAG = "mlflow.parentRunId"


# ----------------------------------------------------------------------------- scopes (driver side)


@dataclass
class Scope:
    """One tracked unit of work: an MLflow run (when ``uri``) and a TensorBoard directory (when ``tb_dir``)."""

    uri: str
    experiment_id: str
    run_id: str | None
    tb_dir: str | None
    log_every: int = 10
    fluent: bool = False  # the run is MLflow's active run in this process (a Tune trial's, from setup_mlflow)
    opened: list = field(default_factory=list)  # handles of open_run children not yet closed
    events: _Events | None = None

    def handle(self) -> dict:
        """What a worker needs to log into this scope (plain data: it travels to other nodes)."""
        return {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "tb_dir": self.tb_dir, "log_every": self.log_every}

    def child(self, name: str, params: dict | None = None, tags: dict | None = None) -> Scope:
        run_id = None
        if self.uri and self.run_id:
            run_id = _create_run(self.uri, self.experiment_id, name, {PARENT_TAG: self.run_id, **(tags or {})}, params)
        tb = storage.join(self.tb_dir, _dirname(name)) if self.tb_dir else None
        return Scope(self.uri, self.experiment_id, run_id, tb, self.log_every)

    def log(self, values: dict[str, float], step: int = 0) -> None:
        if not values:
            return
        if self.uri and self.run_id:
            _send(self.uri, self.run_id, _metrics(values, step))
        if self.tb_dir:
            self.events = self.events or _Events(self.tb_dir)
            self.events.scalars(values, step)

    def end(self, status: str) -> None:
        for h in list(self.opened):
            close_run(h, status="FAILED" if status != "FINISHED" else "KILLED")
        if self.events is not None:
            self.events.close()
        if self.uri and self.run_id:
            try:
                if self.fluent:
                    import mlflow

                    mlflow.end_run(status=status)
                else:
                    _client(self.uri).set_terminated(self.run_id, status)
            except Exception as e:  # noqa: BLE001
                _warn("MLflow run end", e)


_stack: list[Scope] = []


def current() -> Scope | None:
    """The innermost open scope of this process, or None when nothing is tracked."""
    return _stack[-1] if _stack else None


def handle() -> dict | None:
    """The current scope's worker handle, or None."""
    s = current()
    return s.handle() if s is not None else None


@contextlib.contextmanager
def _pushed(scope: Scope):
    _stack.append(scope)
    status = "FAILED"
    try:
        yield scope
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _stack.remove(scope)
        scope.end(status)


@contextlib.contextmanager
def run(cfg, command: str):
    """The parent scope of one command (``run``, ``study``, or a stage's name) on ``cfg``.

    Inside another scope it is a child of it (a study's per-run scope). Yields the scope,
    or None when ``cfg.tracking`` turns both MLflow and TensorBoard off.
    """
    t = cfg.tracking
    parent = current()
    if parent is not None:
        with stage(command, cfg) as s:
            yield s
        return
    if not t.mlflow_uri and not t.tensorboard:
        yield None
        return
    run_id, exp_id = None, ""
    if t.mlflow_uri:
        exp_id = _experiment(t.mlflow_uri, t.experiment)
        tags = {"synthaug.command": command, "synthaug.name": cfg.name}
        run_id = _create_run(t.mlflow_uri, exp_id, f"{cfg.name} {command}", tags, _params(cfg, command))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tb = storage.absolute(storage.join(cfg.work_dir, cfg.name, "tensorboard", f"{_dirname(command)}-{stamp}")) \
        if t.tensorboard else None
    if run_id:
        where = f"{t.mlflow_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}" \
            if t.mlflow_uri.startswith(("http://", "https://")) else f"{run_id} in {t.mlflow_uri}"
        print(f"[tracking] MLflow run: {where}", flush=True)
    if tb:
        print(f"[tracking] TensorBoard: tensorboard --logdir {tb}", flush=True)
    with _pushed(Scope(t.mlflow_uri, exp_id, run_id, tb, t.log_every)) as s:
        yield s


@contextlib.contextmanager
def stage(name: str, cfg=None):
    """A child scope of the current one for stage ``name`` (params: its config sections); a no-op outside one."""
    parent = current()
    if parent is None:
        yield None
        return
    with _pushed(parent.child(name, _params(cfg, name) if cfg is not None else None)) as s:
        yield s


def final(result, **extra: float) -> None:
    """Log a stage's final numbers (see :func:`numbers`) and ``extra`` into the current scope."""
    s = current()
    if s is not None:
        s.log({**numbers(result), **{clean_key(k): float(v) for k, v in extra.items()}})


def reused(what: str, key: str, location: str) -> None:
    """Tag the current run with the identity of an artifact reused by its content key (not a copy of it)."""
    s = current()
    if s is None:
        return
    if s.uri and s.run_id:
        try:
            client = _client(s.uri)
            client.set_tag(s.run_id, "synthaug.reused", "true")
            client.set_tag(s.run_id, clean_key(f"synthaug.reused.{what}"), key)
            client.set_tag(s.run_id, clean_key(f"synthaug.reused.{what}.location"), str(location))
        except Exception as e:  # noqa: BLE001
            _warn("MLflow tagging", e)


def artifacts(location: str, path: str | None = None) -> None:
    """Log the files under ``location`` (a local directory or a URI) as the current run's artifacts."""
    s = current()
    if s is None or not (s.uri and s.run_id) or not storage.exists(location):
        return
    local = storage.local_path(location)
    tmp = None
    try:
        if local is None:
            tmp = tempfile.mkdtemp(prefix="synthaug-artifacts-")
            local = storage.download_dir(location, tmp)
        _client(s.uri).log_artifacts(s.run_id, str(local), path)
    except Exception as e:  # noqa: BLE001
        _warn("MLflow artifact upload", e)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def open_run(name: str, params: dict | None = None, tags: dict | None = None) -> dict | None:
    """A child run of the current scope for one trained artifact (a classifier); returns its worker handle.

    The driver owns it: :func:`close_run` ends it with the final metrics; a scope that
    ends first marks it failed.
    """
    s = current()
    if s is None:
        return None
    params = {clean_key(k): str(v)[:6000] for k, v in flatten(params or {}).items()}
    h = s.child(name, params, tags).handle()
    s.opened.append(h)
    return h


def close_run(h: dict | None, metrics: dict | None = None, status: str = "FINISHED") -> None:
    """End a run from :func:`open_run`, logging ``metrics``' numbers first."""
    if not h:
        return
    for s in _stack:
        if h in s.opened:
            s.opened.remove(h)
    scope = Scope(h["uri"], h["experiment_id"], h["run_id"], h["tb_dir"], h["log_every"])
    if metrics:
        scope.log({f"final/{k}": v for k, v in numbers(metrics).items()})
    scope.end(status)


# ----------------------------------------------------------------------------- worker side


class StepLogger:
    """Rank 0's per-step (or per-epoch) metrics into the handle's MLflow run and TensorBoard directory.

    MLflow metrics are sent in batches (every 500 values or 15 s, and on close), so a
    logged step costs no request. Other ranks and a None handle log nothing.
    """

    def __init__(self, h: dict | None, rank: int = 0):
        self.on = bool(h) and rank == 0
        self.h = h or {}
        self.every = int(self.h.get("log_every", 10))
        self.events = _Events(self.h["tb_dir"]) if self.on and self.h.get("tb_dir") else None
        self.pending: list = []
        self.sent = time.time()

    def due(self, step: int, last: int) -> bool:
        return self.on and (step % self.every == 0 or step == last)

    def log(self, metrics: dict, step: int) -> None:
        if not self.on:
            return
        values = numbers(metrics)
        if self.events is not None:
            self.events.scalars(values, step)
        if self.h.get("uri") and self.h.get("run_id"):
            self.pending += _metrics(values, step)
            if len(self.pending) >= 500 or time.time() - self.sent > 15:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            _send(self.h["uri"], self.h["run_id"], self.pending)
        self.pending, self.sent = [], time.time()

    def close(self) -> None:
        if not self.on:
            return
        self.flush()
        if self.events is not None:
            self.events.close()


@contextlib.contextmanager
def trial(h: dict | None, name: str, config: dict):
    """A Tune trial's scope, nested under the sweep's run ``h``: Ray's ``setup_mlflow`` opens its
    MLflow run (trial config as params, the parent tag) and the trial's TensorBoard directory
    sits in the sweep's. Yields the trial's handle (None without tracking)."""
    if not h:
        yield None
        return
    run_id = None
    if h["uri"] and h["run_id"]:
        import mlflow
        from ray.air.integrations.mlflow import setup_mlflow

        _quiet()
        if mlflow.active_run() is not None:  # left by a trial that died in this (reused) actor: setup_mlflow would adopt it
            mlflow.end_run(status="KILLED")
        mlflow = setup_mlflow(dict(config), tracking_uri=h["uri"], experiment_id=h["experiment_id"], run_name=name,
                              tags={PARENT_TAG: h["run_id"], "synthaug.trial": name})
        run_id = mlflow.active_run().info.run_id
    tb = storage.join(h["tb_dir"], _dirname(name)) if h["tb_dir"] else None
    with _pushed(Scope(h["uri"], h["experiment_id"], run_id, tb, h["log_every"], fluent=True)) as s:
        yield s.handle()
