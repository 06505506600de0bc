"""``ray job submit`` and the CLI against a real Ray head started with the CLI, as a user would run it.

The head is started by :mod:`tests.raycli` (its own temp dir and free ports on
127.0.0.1; stopped by PID, never with ``ray stop``). The whole pipeline as a submitted job,
and its stop and resubmission, run on the two-node cluster (``test_multinode.py``).
"""

from __future__ import annotations

import json
import sys
import uuid
import warnings

import pytest

import raycli as R

JOB_CONFIG = "jobs/configs/tiny.yaml"
JOB_TIMEOUT_S = 900


def _num_cpus() -> int:
    """The logical CPUs a local Ray gets (synthaug.config), so the job sees the same cluster shape."""
    from synthaug.config import RayConfig

    return RayConfig().num_cpus


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head from the CLI, on free ports and its own temp dir; stopped however the tests end."""
    head = R.start_head(tmp_path_factory.mktemp("ray_head") / "ray_head.log", num_cpus=_num_cpus())
    try:
        yield head
    finally:
        killed = R.stop(head)
        if killed:
            warnings.warn("killed after the head stopped:\n  " + "\n  ".join(killed), stacklevel=1)


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
    proc = R.submit(ray_head, R.working_dir(tmp_path / "src"), submission_id, [sys.executable, "-c", _DRIVER],
                    JOB_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    line = next((ln for ln in out.splitlines() if ln.startswith("DRIVER ")), None)
    assert line, out[-6000:]
    seen = json.loads(line.removeprefix("DRIVER "))
    assert seen["ray_address"] == seen["gcs_address"], seen
    assert seen["gcs_address"].endswith(f":{ray_head.gcs_port}"), seen
    assert seen["cpus"] == _num_cpus(), seen
    details = R.job_details(ray_head, submission_id)
    assert details.driver_info is not None and details.driver_info.id == seen["job_id"], details


# ----------------------------------------------------------------------------- content keys


def test_changed_hyperparameter_is_a_new_run_and_same_one_is_reused(ray_head, tmp_path):
    """Issue 13's example: two learning rates give two results; re-running either reuses its own."""
    import subprocess

    base = [str(R.SYNTHAUG), "--config", JOB_CONFIG, f"ray.address={ray_head.address}",
            f"work_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}"]

    def run(*args) -> subprocess.CompletedProcess:
        proc = subprocess.run([base[0], *args, *base[1:]], env=R.cli_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc

    def top1(proc) -> float:
        return json.loads(proc.stdout[proc.stdout.rindex("{"):])["top1_mean"]

    run("ingest")
    fast = run("classify", "classify.epochs=3", "classify.lr=0.003", "--ratio", "0")
    slow = run("classify", "classify.epochs=3", "classify.lr=0.00001", "--ratio", "0")
    assert top1(fast) != top1(slow), (top1(fast), top1(slow))
    assert "reusing the finished run" not in slow.stdout
    again = run("classify", "classify.epochs=3", "classify.lr=0.003", "--ratio", "0")
    assert "reusing the finished run" in again.stdout and top1(again) == top1(fast)
    assert "reusing the datasets" in run("ingest").stdout  # same source and config: not ingested again
    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "classify").glob("r0-mix-seed0-*") if p.is_dir())
    assert len(runs) == 2 and all(json.loads((tmp_path / "runs" / "tiny" / "classify" / r / "artifact.json").read_text())
                                  ["key"].startswith(r.rsplit("-", 1)[1]) for r in runs), runs
