"""``ray job submit`` against a real Ray head started with the CLI, as a user would run it.

The head is ``ray start --head --block`` in its own process group with its own
``--temp-dir`` and free ports, so it neither clashes with nor stops any other Ray on the
machine. ``ray stop`` has no ``--address`` and would stop every Ray here (another test's
included), so teardown instead sends SIGTERM to our ``--block`` process, which shuts down
the processes it started; anything left that still names our temp dir (or runs in it,
like the job's driver) is killed after that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# What the job runs: the whole tiny pipeline, 1-3 minutes on 2 cores.
JOB_SCRIPT = "jobs/pipeline.py"
JOB_CONFIG = "jobs/configs/tiny.yaml"
JOB_TIMEOUT_S = 900
HEAD_START_TIMEOUT_S = 120


def _num_cpus() -> int:
    """The logical CPUs a local Ray gets (synthaug.config), so the job sees the same cluster shape."""
    from synthaug.config import RayConfig

    return RayConfig().num_cpus


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cli_env() -> dict:
    """Environment for the Ray CLI; the head, and so the job's driver, inherit it."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the CLI gets --address; the driver gets RAY_ADDRESS from the job supervisor
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return env


@dataclass(frozen=True)
class Head:
    gcs_port: int  # the GCS listens on the node's IP, which need not be 127.0.0.1
    dashboard_url: str
    temp_dir: Path
    log: Path


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"dashboard at {url} not up after {timeout}s:\n{log.read_text()[-4000:]}")


def _ours(temp_dir: Path) -> list:
    """Live processes that name our temp dir on their command line or run inside it."""
    import psutil

    key = str(temp_dir)
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid():
                continue
            if any(key in arg for arg in p.cmdline()) or p.cwd().startswith(key):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _stop_head(proc: subprocess.Popen, temp_dir: Path) -> list[str]:
    """Stop only our head; returns the command lines of processes the sweep had to kill."""
    import psutil

    # Graceful: `ray start --block` kills the processes it started on SIGTERM.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Then anything of ours that outlived it (same process group, or naming our temp dir).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leftovers = _ours(temp_dir)
    killed = []
    for p in leftovers:
        try:
            killed.append(" ".join(p.cmdline())[:200])
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    return killed


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head from the CLI, on free ports and its own temp dir; stopped however the tests end."""
    # Unix socket paths under the temp dir must stay short (~107 chars), so not under tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="synthaug-ray-", dir="/tmp"))
    gcs, dash, client, agent_http, agent_grpc, rt_env = _free_ports(6)
    log = tmp_path_factory.mktemp("ray_head") / "ray_head.log"
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--num-cpus={_num_cpus()}", "--num-gpus=0",
        "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    # No drain wait on SIGTERM (30 s by default, for Serve on Kubernetes): a test head has nothing to drain.
    env = {**_cli_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log, "w") as log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = Head(gcs, f"http://127.0.0.1:{dash}", temp_dir, log)
    try:
        _wait_for_dashboard(head.dashboard_url, proc, log, HEAD_START_TIMEOUT_S)
        # The teardown sweep finds our processes by the temp dir; make sure that works.
        assert _ours(temp_dir), "no process names our temp dir; the teardown sweep would miss leftovers"
        yield head
    finally:
        killed = _stop_head(proc, temp_dir)
        if killed:
            warnings.warn("killed after the head stopped:\n  " + "\n  ".join(killed), stacklevel=1)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _working_dir(dest: Path) -> Path:
    """Only what the job needs (no .venv, runs/, results/): the package, the jobs, the project file."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    shutil.copytree(REPO / "synthaug", dest / "synthaug", ignore=ignore)
    shutil.copytree(REPO / "jobs", dest / "jobs", ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _submit(head: Head, working_dir: Path, submission_id: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    # The head's environment (_cli_env) already reaches the driver. Only keys init_ray does not
    # set itself go here: Ray refuses to merge a job's and a driver's runtime env that both set
    # the same env var (HF_HUB_OFFLINE, RAY_TRAIN_V2_ENABLED) unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1.
    runtime_env = {"env_vars": {"RAY_AUTH_MODE": "disabled"}}
    cmd = [
        RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
        "--working-dir", str(working_dir), "--runtime-env-json", json.dumps(runtime_env),
        "--", *entrypoint,
    ]  # fmt: skip
    try:
        return subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run([RAY, "job", "stop", "--address", head.dashboard_url, submission_id], env=_cli_env(), timeout=60)
        raise


def _job_details(head: Head, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    return next(j for j in client.list_jobs() if j.submission_id == submission_id)


# Under `ray job submit` the driver must join the cluster it was submitted to: the job
# supervisor sets RAY_ADDRESS and synthaug.raylocal.init_ray uses it. Cheap to check alone.
_DRIVER = """
import json, os, ray
from synthaug.raylocal import init_ray
init_ray()
ctx = ray.get_runtime_context()
print("DRIVER", json.dumps({"ray_address": os.environ.get("RAY_ADDRESS"), "gcs_address": ctx.gcs_address,
                            "job_id": ctx.get_job_id(), "cpus": ray.cluster_resources().get("CPU")}))
"""


def test_driver_joins_submitted_cluster(ray_head, tmp_path):
    submission_id = f"synthaug-test-{uuid.uuid4().hex[:8]}"
    proc = _submit(ray_head, _working_dir(tmp_path / "src"), submission_id, [sys.executable, "-c", _DRIVER])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    line = next((ln for ln in out.splitlines() if ln.startswith("DRIVER ")), None)
    assert line, out[-6000:]
    seen = json.loads(line.removeprefix("DRIVER "))
    assert seen["ray_address"] == seen["gcs_address"], seen
    assert seen["gcs_address"].endswith(f":{ray_head.gcs_port}"), seen
    assert seen["cpus"] == _num_cpus(), seen
    details = _job_details(ray_head, submission_id)
    assert details.driver_info is not None and details.driver_info.id == seen["job_id"], details


def test_pipeline_job_on_submitted_cluster(ray_head, tmp_path):
    work_dir, results_dir = tmp_path / "runs", tmp_path / "results"
    submission_id = f"synthaug-test-{uuid.uuid4().hex[:8]}"
    entrypoint = [
        sys.executable, JOB_SCRIPT, "--config", JOB_CONFIG,
        f"work_dir={work_dir}", f"results_dir={results_dir}",
    ]  # fmt: skip

    t0 = time.monotonic()
    proc = _submit(ray_head, _working_dir(tmp_path / "src"), submission_id, entrypoint)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    print(f"job took {elapsed:.0f}s")
    assert proc.returncode == 0, out[-6000:]

    # The driver joined the cluster it was submitted to, not a Ray of its own.
    details = _job_details(ray_head, submission_id)
    assert details.status == "SUCCEEDED", details
    assert details.driver_info is not None, "the driver never registered with the submitted cluster"
    assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{ray_head.gcs_port}\b", out), out[-6000:]
    assert "Started a local Ray instance" not in out

    # The run's outputs: the report in the results dir, the resolved config in the work dir.
    metrics = list(results_dir.rglob("metrics.json"))
    assert len(metrics) == 1, sorted(results_dir.rglob("*"))
    run_results = metrics[0].parent
    assert json.loads(metrics[0].read_text()), "empty metrics.json"
    assert (run_results / "summary.md").read_text().strip()
    assert list(work_dir.rglob("config.run.yaml"))

