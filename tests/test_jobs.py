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


# Fine-tuning and sampling made long enough to be stopped in the middle (with checkpoints
# to resume from, and many small sampling chunks); the reference run uses the same. What
# comes after sampling is cut short (one guidance value, one-epoch classifiers, no
# pseudo-label stage: test_multinode.py runs the whole tiny pipeline), since this run is
# submitted four times.
RESUBMIT = ["finetune.steps=160", "finetune.checkpoint_every=20", "sample.per_class=16", "sample.batch_size=4", "sample.steps=40",
            "sample.chunk_size=4", "sweep.guidance_scales=[2.0]", "classify.epochs=1", "evaluate.extractor_epochs=1",
            "pseudolabel.enabled=false"]


def _entrypoint(tmp_path, name: str) -> tuple[list[str], object, object]:
    work_dir, results_dir = tmp_path / name / "runs", tmp_path / name / "results"
    cmd = [sys.executable, JOB_SCRIPT, "--config", JOB_CONFIG, f"work_dir={work_dir}", f"results_dir={results_dir}",
           *RESUBMIT]
    return cmd, work_dir, results_dir


@pytest.fixture(scope="module")
def reference_run(ray_head, tmp_path_factory):
    """The tiny pipeline submitted once and left alone: the undisturbed run the resubmitted one must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    entrypoint, work_dir, results_dir = _entrypoint(tmp, "ref")
    submission_id = f"synthaug-test-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    proc = _submit(ray_head, _working_dir(tmp / "src"), submission_id, entrypoint)
    print(f"job took {time.monotonic() - t0:.0f}s")
    return {"proc": proc, "work_dir": work_dir, "results_dir": results_dir, "submission_id": submission_id}


def test_pipeline_job_on_submitted_cluster(ray_head, reference_run):
    proc, work_dir, results_dir = reference_run["proc"], reference_run["work_dir"], reference_run["results_dir"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    # The driver joined the cluster it was submitted to, not a Ray of its own.
    details = _job_details(ray_head, reference_run["submission_id"])
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



# ----------------------------------------------------------------------------- stop and resubmit


def _outputs(work_dir, results_dir) -> dict:
    """What a run produced, by content: every manifest's content / weights hash, and the flat metrics."""
    out = {}
    for m in sorted(work_dir.rglob("manifest.json")):
        rel = m.parent.relative_to(work_dir)
        if rel.parts[0] == "samples":  # keyed by content already; name them by guidance instead
            rel = f"samples/w{json.loads(m.read_text())['sample']['guidance_scale']:g}"
        man = json.loads(m.read_text())
        out[str(rel)] = man.get("content_hash") or man.get("weights_hash")
    metrics = json.loads(next(results_dir.rglob("metrics.json")).read_text())
    out["metrics"] = {k: v for k, v in metrics.items() if not k.startswith(("seconds", "run"))}
    return out


def _file_hashes(root, pattern: str) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob(pattern))
            if p.is_file()}


def _stop_when(head, submission_id: str, condition, what: str, timeout: float = 600) -> None:
    """Poll until ``condition()`` holds while the job runs, then ``ray job stop`` it and wait until it stopped."""
    import subprocess

    from ray.job_submission import JobStatus

    t0 = time.monotonic()
    while not condition():
        status = _job_details(head, submission_id).status
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), f"job {status} before {what}"
        assert time.monotonic() - t0 < timeout, f"no {what} within {timeout}s"
        time.sleep(0.25)
    subprocess.run([R.RAY, "job", "stop", "--address", head.dashboard_url, submission_id], env=R.cli_env(),
                   capture_output=True, timeout=120)
    while _job_details(head, submission_id).status not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        assert time.monotonic() - t0 < timeout + 120, f"job {submission_id} did not stop"
        time.sleep(0.5)
    assert _job_details(head, submission_id).status == JobStatus.STOPPED, f"the job ended on its own before {what}"


def _logs(head, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url).get_job_logs(submission_id)


def test_stop_and_resubmit_resumes_and_matches_undisturbed_run(ray_head, reference_run, tmp_path):
    """Stopped with ``ray job stop`` once in fine-tuning and once in sampling, the same command
    resubmitted twice ends with exactly the undisturbed run's outputs, and completed stages
    are reused, not run again."""
    from synthaug.generative.finetune import latest_step

    assert reference_run["proc"].returncode == 0, (reference_run["proc"].stdout + reference_run["proc"].stderr)[-4000:]
    entrypoint, work_dir, results_dir = _entrypoint(tmp_path, "disturbed")
    run = work_dir / "tiny"
    src = _working_dir(tmp_path / "src")
    ids = [f"synthaug-resubmit-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]

    def in_finetune():  # a registered fine-tune checkpoint, and no export yet
        runs = list((run / "ray").glob("finetune-*"))
        return bool(runs) and latest_step(str(runs[0])) >= 20 and not (run / "generators" / "finetune" / "manifest.json").exists()

    def in_sampling():  # a set with a plan and some shards, but no manifest
        for plan in (work_dir / "samples").glob("*/plan.json"):
            if list(plan.parent.rglob("chunk-*.parquet")) and not (plan.parent / "manifest.json").exists():
                return True
        return False

    _submit_async = lambda sid: R.submit(ray_head, src, sid, entrypoint, JOB_TIMEOUT_S, no_wait=True)  # noqa: E731
    assert _submit_async(ids[0]).returncode == 0
    _stop_when(ray_head, ids[0], in_finetune, "a fine-tuning checkpoint")
    ingested = _file_hashes(run / "data", "*")
    pretrained = _file_hashes(run / "generators" / "pretrain", "*")

    assert _submit_async(ids[1]).returncode == 0
    _stop_when(ray_head, ids[1], in_sampling, "a partly sampled set")
    second = _logs(ray_head, ids[1])
    assert "[ingest]" in second and "reusing the datasets" in second, second[-4000:]
    assert re.search(r"\[pretrain\] .*reusing the export", second), second[-4000:]
    resumed = re.search(r"\[finetune\] resumed at step (\d+)/160", second)
    assert resumed and int(resumed.group(1)) >= 20, second[-4000:]

    proc = R.submit(ray_head, src, ids[2], entrypoint, JOB_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    third = _logs(ray_head, ids[2])
    for stage in ("pretrain", "finetune"):
        assert re.search(rf"\[{stage}\] .*reusing the export", third), third[-4000:]
    assert re.search(r"\[sample\] .*(resum|reusing)", third), third[-4000:]

    # Completed stages were not redone: their files are byte for byte the first submission's.
    assert _file_hashes(run / "data", "*") == ingested
    assert _file_hashes(run / "generators" / "pretrain", "*") == pretrained
    # And the outputs equal the undisturbed run's, by content.
    assert _outputs(work_dir, results_dir) == _outputs(reference_run["work_dir"], reference_run["results_dir"])


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
