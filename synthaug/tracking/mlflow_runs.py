"""MLflow calls of synthaug.tracking: a client, batched metrics, runs, params and the experiment.

Nothing here imports mlflow until a call needs it; every failure but an unreachable server
(the user's input) is one warning line, and the work goes on.
"""

from __future__ import annotations

import os
import time

_warned: set = set()


def _warn(what: str, e: BaseException) -> None:
    """One line per kind of failure: tracking problems never stop the work."""
    if what not in _warned:
        _warned.add(what)
        print(f"[tracking] {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "the run goes on without it", flush=True)


def _quiet() -> None:
    """MLflow prints a 'View run' line each time a run ends; the parent's link is printed once instead."""
    from synthaug import console

    if not console.verbose():
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _client(uri: str):
    from mlflow import MlflowClient

    _quiet()
    return MlflowClient(tracking_uri=uri)


def _send(uri: str, run_id: str, metrics: list) -> None:
    """Metrics (``mlflow.entities.Metric``) to a run, in batches of MLflow's 1000 at most; failures warn."""
    try:
        client = _client(uri)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
    except Exception as e:  # noqa: BLE001 -- tracking never stops the work
        _warn("MLflow logging", e)


def _metrics(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, v, ts, step) for k, v in values.items()]


def _create_run(uri: str, experiment_id: str, name: str, tags: dict, params: dict | None) -> str | None:
    try:
        client = _client(uri)
        r = client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        _log_params(client, r.info.run_id, params or {})
        return r.info.run_id
    except Exception as e:  # noqa: BLE001
        _warn("MLflow run creation", e)
        return None


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def _experiment(uri: str, name: str) -> str:
    """The experiment's id (created when missing); an unreachable server is the user's input error."""
    from synthaug.errors import InputValueError

    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
        except Exception as e:  # noqa: BLE001
            raise InputValueError(f"config key 'tracking.mlflow_uri': no MLflow server answers at {uri} ({e})") from None
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
