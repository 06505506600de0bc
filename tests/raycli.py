"""Real Ray nodes from the CLI for tests: a head, extra worker nodes, ``ray job submit``.

Each node is ``ray start --block`` in its own process group, with its own ``--temp-dir``
and free ports on 127.0.0.1, so it neither clashes with nor stops any other Ray on the
machine. ``ray stop`` has no ``--address`` and would stop every Ray here (another test's
included), so teardown instead sends SIGTERM to our ``--block`` process, which shuts down
the processes it started; anything left that still names our temp dir (or runs in it,
like a job's driver) is killed after that, by PID.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from s3server import free_ports  # noqa: F401  (one free-port helper for the tests' servers)

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SYNTHAUG = str(Path(sys.executable).with_name("synthaug"))
START_TIMEOUT_S = 120


def cli_env(extra: dict | None = None) -> dict:
    """Environment for the Ray CLI; the nodes, and so the job's driver and workers, inherit it."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the CLI gets --address; the driver gets RAY_ADDRESS from the job supervisor
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # a test node has nothing to drain
    env.update(extra or {})
    return env


@dataclass
class Node:
    """One ``ray start --block`` process and what identifies its processes."""

    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    gcs_port: int = 0
    dashboard_url: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"


def _wait(check, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if check():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} not up after {timeout}s:\n{log.read_text()[-4000:]}")


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as log_f:
        return subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def start_head(log: Path, num_cpus: int, env: dict | None = None) -> Node:
    """A head on 127.0.0.1 with its own temp dir; ``num_cpus=0`` makes it CPU-less like cluster.yaml's."""
    # Unix socket paths under the temp dir must stay short (~107 chars), so not under tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="synthaug-ray-", dir="/tmp"))
    gcs, dash, client, agent_http, agent_grpc, rt_env, dash_metrics = free_ports(7)
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    # Its dashboard's metrics port too: the test session's own Ray may hold the one in the environment.
    env = {"DASHBOARD_METRIC_PORT": str(dash_metrics), **(env or {})}
    node = Node(_spawn(cmd, log, cli_env(env)), temp_dir, log, gcs, f"http://127.0.0.1:{dash}")
    try:
        _wait(lambda: _dashboard_up(node.dashboard_url), node.proc, log, START_TIMEOUT_S, f"dashboard {node.dashboard_url}")
        assert ours(temp_dir), "no process names our temp dir; the teardown sweep would miss leftovers"
    except BaseException:
        stop(node)
        raise
    return node


def start_worker(head: Node, log: Path, num_cpus: int, env: dict | None = None,
                 resources: dict | None = None) -> Node:
    """A second node joined to ``head`` with ``ray start --address``: its own temp dir and ports."""
    temp_dir = Path(tempfile.mkdtemp(prefix="synthaug-rayw-", dir="/tmp"))
    nm, om, agent_http, agent_grpc, rt_env, metrics = free_ports(6)
    lo, hi = worker_port_range()
    cmd = [
        RAY, "start", "--block", "--disable-usage-stats", f"--address={head.address}", "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--node-manager-port={nm}", f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        f"--min-worker-port={lo}", f"--max-worker-port={hi}", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    node = Node(_spawn(cmd, log, cli_env(env)), temp_dir, log)
    try:
        _wait(lambda: _cluster_cpus(head) >= num_cpus, node.proc, log, START_TIMEOUT_S, "worker node")
    except BaseException:
        stop(node)
        raise
    return node


def worker_port_range(width: int = 200) -> tuple[int, int]:
    """Ports for a worker node's workers, all free now, below the kernel's ephemeral range.

    Not next to a port ``free_ports`` returned: those come from the ephemeral range, and a range
    around one once overlapped the node's own agent port ("worker_ports is trying to use a port
    number ... used by other components"), which made ``ray start`` exit. Each pytest-xdist worker
    draws from its own block, so two test processes never share a range either.
    """
    lo_all, hi_all = 20000, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 1
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    block = (hi_all - lo_all) // max(count, 1)
    first = lo_all + index * block
    starts = list(range(first, first + block - width, width + 1))
    random.shuffle(starts)
    for lo in starts:
        if all(_bindable(p) for p in range(lo, lo + width + 1)):
            return lo, lo + width
    raise RuntimeError(f"no {width + 1} free ports in a row between {first} and {first + block}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _cluster_cpus(head: Node) -> float:
    try:
        with urllib.request.urlopen(f"{head.dashboard_url}/nodes?view=summary", timeout=3) as r:
            data = json.loads(r.read())
        nodes = data.get("data", {}).get("summary", [])
        return sum(float(n.get("raylet", {}).get("resourcesTotal", {}).get("CPU", 0))
                   for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")
    except (OSError, ValueError):
        return 0.0


def ours(temp_dir: Path) -> list:
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


def stop(node: Node) -> list[str]:
    """Stop only our node; returns the command lines of processes the sweep had to kill."""
    import psutil

    proc = node.proc
    if proc.poll() is None:  # graceful: `ray start --block` kills the processes it started on SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # then anything of ours that outlived it (same process group, or naming our temp dir)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leftovers = ours(node.temp_dir)
    killed = []
    for p in leftovers:
        try:
            killed.append(" ".join(p.cmdline())[:200])
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    return killed


def working_dir(dest: Path) -> Path:
    """Only what a job needs (no .venv, runs/, results/): the package, the jobs, the project file."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    shutil.copytree(REPO / "synthaug", dest / "synthaug", ignore=ignore)
    shutil.copytree(REPO / "jobs", dest / "jobs", ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def submit(head: Node, wd: Path, submission_id: str, entrypoint: list[str], timeout: float,
           env_vars: dict | None = None, no_wait: bool = False) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir`` as the README says; stops the job if it outlives ``timeout``."""
    # The nodes' environment (cli_env) already reaches the driver. Only keys init_ray does not
    # set itself go here: Ray refuses to merge a job's and a driver's runtime env that both set
    # the same env var (HF_HUB_OFFLINE, RAY_TRAIN_V2_ENABLED) unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1.
    runtime_env = {"env_vars": {"RAY_AUTH_MODE": "disabled", **(env_vars or {})}}
    cmd = [
        RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
        "--working-dir", str(wd), "--runtime-env-json", json.dumps(runtime_env),
        *(["--no-wait"] if no_wait else []), "--", *entrypoint,
    ]  # fmt: skip
    try:
        return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run([RAY, "job", "stop", "--address", head.dashboard_url, submission_id], env=cli_env(), timeout=60)
        raise


def job_details(head: Node, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    return next(j for j in client.list_jobs() if j.submission_id == submission_id)
