"""``ray job submit`` against a real Ray head started with the CLI, as a user would run it.

The head is started by :mod:`tests.raycli` (its own temp dir and free ports on
127.0.0.1; stopped by PID, never with ``ray stop``).
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
import warnings

import pytest

import raycli as R

# What the job runs: the whole tiny pipeline, 1-3 minutes on 2 cores.
JOB_SCRIPT = "jobs/pipeline.py"
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


def _submit(head, working_dir, submission_id, entrypoint):
    return R.submit(head, working_dir, submission_id, entrypoint, JOB_TIMEOUT_S)


def _working_dir(dest):
    return R.working_dir(dest)


def _job_details(head, submission_id):
    return R.job_details(head, submission_id)


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

