"""A two-node Ray cluster on this machine, as users run synthaug: ``ray job submit`` to a CPU-less head.

The head is ``ray start --head --num-cpus=0`` (like cluster.yaml's head); a second node
joins with ``ray start --address ...`` and holds every CPU. Each node has its own temp dir
and ports on 127.0.0.1 (:mod:`raycli`). The tiny pipeline is submitted with
``ray job submit --working-dir .`` exactly as the README says, with ``work_dir`` and
``results_dir`` on the local S3-compatible server; this is CI's run of the whole tiny
pipeline on S3, so its outputs are checked in full (``test_pipeline.check_run_outputs``). Every task and Train worker must land
on the second node (the head has no CPUs), so nothing may depend on the driver's local
disk or working directory. The same run is the undisturbed reference of the stop-and-resubmit
test: the same command stopped twice with ``ray job stop`` and submitted again must end with
exactly its outputs. Only the processes this test started are stopped, by PID.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import uuid
import warnings

import pytest

import raycli as R
from test_pipeline import FAST, check_run_outputs

JOB_TIMEOUT_S = 1500
# The whole tiny pipeline (FAST), with fine-tuning and sampling long enough to be stopped in the
# middle: checkpoints to resume from, and many small sampling chunks.
RUN = [*FAST, "finetune.steps=160", "finetune.checkpoint_every=20", "sample.per_class=16", "sample.batch_size=4",
       "sample.steps=20", "sample.chunk_size=4"]


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("two_nodes")
    head = R.start_head(logs / "head.log", num_cpus=0)
    nodes = [head]
    try:
        nodes.append(R.start_worker(head, logs / "worker.log", num_cpus=6))
        yield head, nodes[1]
    finally:
        for n in reversed(nodes):
            killed = R.stop(n)
            if killed:
                warnings.warn("killed after the node stopped:\n  " + "\n  ".join(killed), stacklevel=1)


def _node_ids(head: R.Node) -> dict[str, bool]:
    """node id -> is_head_node, from the head's state API."""
    from ray.util.state import list_nodes

    return {n.node_id: bool(n.is_head_node) for n in list_nodes(address=head.dashboard_url)}


def test_local_work_dir_refused_on_two_nodes(two_nodes, tmp_path):
    """The tiny config's default, relative work_dir submitted to the two-node cluster: refused
    in one line before any work (the job fails; nothing was ingested)."""
    head, _ = two_nodes
    submission_id = f"synthaug-2node-local-{uuid.uuid4().hex[:8]}"
    entrypoint = [sys.executable, "jobs/ingest.py", "--config", "jobs/configs/tiny.yaml"]
    proc = R.submit(head, R.working_dir(tmp_path / "src"), submission_id, entrypoint, 600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and R.job_details(head, submission_id).status == "FAILED", out[-4000:]
    line = ("synthaug ingest: error: config key 'work_dir': ", " is a local path, but the Ray cluster has 2 nodes that "
            "do not share this machine's disk; use an s3:// (or gs://) URI, or a mount every node sees with "
            "shared_mount=true")
    assert any(ln.startswith(line[0]) and ln.endswith(line[1]) for ln in out.splitlines()), out[-4000:]
    assert "Traceback" not in out, out[-4000:]


def _entrypoint(s3_server, name: str) -> tuple[list[str], str, str]:
    work_dir, results_dir = s3_server.root(f"{name}-runs"), s3_server.root(f"{name}-results")
    cmd = [sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/tiny.yaml",
           f"work_dir={work_dir}", f"results_dir={results_dir}", *RUN]
    return cmd, work_dir, results_dir


@pytest.fixture(scope="module")
def reference_run(two_nodes, s3_server, tmp_path_factory):
    """The tiny pipeline submitted once and left alone (the stop-and-resubmit test's undisturbed run)."""
    head, _ = two_nodes
    entrypoint, work_dir, results_dir = _entrypoint(s3_server, "twonode")
    submission_id = f"synthaug-2node-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    proc = R.submit(head, R.working_dir(tmp_path_factory.mktemp("src") / "src"), submission_id, entrypoint, JOB_TIMEOUT_S)
    print(f"two-node job took {time.monotonic() - t0:.0f}s")
    return {"proc": proc, "work_dir": work_dir, "results_dir": results_dir, "submission_id": submission_id}


def test_pipeline_job_on_cpu_less_head_and_worker_node(two_nodes, reference_run):
    from synthaug import artifacts, storage

    head, _ = two_nodes
    proc, work_dir, results_dir = reference_run["proc"], reference_run["work_dir"], reference_run["results_dir"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    details = R.job_details(head, reference_run["submission_id"])
    assert details.status == "SUCCEEDED", details
    # The driver joined the cluster it was submitted to, not a Ray of its own.
    assert details.driver_info is not None, "the driver never registered with the submitted cluster"
    assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{head.gcs_port}\b", out), out[-6000:]
    assert "Started a local Ray instance" not in out

    # Complete outputs, all on the object store.
    check_run_outputs(work_dir, results_dir)
    run = storage.join(work_dir, "tiny")
    for split in ("train", "val", "pool", "train_full"):
        assert artifacts.is_complete(storage.join(run, "data", split)), split
    for stage in ("pretrain", "finetune"):
        assert artifacts.is_complete(storage.join(run, "generators", stage)), stage
    samples = storage.list_dirs(storage.join(work_dir, "samples"))
    assert samples and all(artifacts.is_complete(storage.join(work_dir, "samples", s)) for s in samples), samples
    metrics = storage.read_json(storage.join(results_dir, "tiny", "metrics.json"))
    assert metrics, "empty metrics.json"
    assert storage.read_text(storage.join(results_dir, "tiny", "summary.md")).strip()

    # Every actor and task that needs a CPU or GPU (Train workers, Tune trials, one-worker
    # training tasks, Ray Data's read, sampling and feature tasks and actors) ran on the worker
    # node: the head has none to give. Ray's zero-resource control actors (PlacementGroupCleaner,
    # SplitCoordinator, DatasetManager, ...) may sit on the head.
    from ray.util.state import list_actors, list_tasks

    heads = {nid for nid, is_head in _node_ids(head).items() if is_head}
    actors = [(a.class_name, a.node_id, a.required_resources)
              for a in list_actors(address=head.dashboard_url, limit=10000, detail=True)
              if a.job_id and a.class_name not in ("JobSupervisor",)]
    tasks = [(t.name, t.node_id, t.required_resources) for t in list_tasks(address=head.dashboard_url, limit=10000, detail=True)
             if t.job_id and t.node_id and t.type == "NORMAL_TASK"]

    def needs_compute(resources) -> bool:
        r = resources or {}
        return float(r.get("CPU", 0)) > 0 or float(r.get("GPU", 0)) > 0

    workers = [(name, node) for name, node, r in actors + tasks if needs_compute(r)]
    assert workers, "no actor or task that needs compute was seen"
    on_head = sorted({name for name, node in workers if node in heads})
    assert not on_head, f"actors or tasks that need compute ran on the CPU-less head: {on_head}"
    print(json.dumps(sorted({name for name, _ in workers})))


# ----------------------------------------------------------------------------- stop and resubmit


def _outputs(work_dir: str, results_dir: str) -> dict:
    """What a run produced, by content: every manifest's content / weights hash, and the flat metrics."""
    from synthaug import storage

    root = storage.resolve(work_dir)[1]
    out = {}
    for i in storage.list_files(work_dir):
        if not i.path.endswith("/manifest.json"):
            continue
        rel = i.path[len(root):].strip("/").removesuffix("/manifest.json")
        man = json.loads(storage.read_text(storage.join(work_dir, rel, "manifest.json")))
        if rel.startswith("samples/"):  # keyed by content already; name them by guidance instead
            rel = f"samples/w{man['sample']['guidance_scale']:g}"
        out[rel] = man.get("content_hash") or man.get("weights_hash")
    metrics = storage.read_json(storage.join(results_dir, "tiny", "metrics.json"))
    out["metrics"] = {k: v for k, v in metrics.items() if not k.startswith(("seconds", "run"))}
    return out


def _files(location: str) -> dict:
    """Every object below a location: (bytes hash, modification time). A stage run again rewrites its
    objects (a new mtime) even when the bytes come out the same."""
    from synthaug import storage

    fs, root = storage.resolve(location)
    files = {}
    for i in storage.list_files(location):
        with fs.open_input_stream(i.path) as f:
            files[i.path[len(root):]] = (hashlib.sha256(f.read()).hexdigest(), i.mtime_ns)
    return files


def _stop_when(head, submission_id: str, condition, what: str, timeout: float = 900) -> None:
    """Poll until ``condition()`` holds while the job runs, then ``ray job stop`` it and wait until it stopped."""
    import subprocess

    from ray.job_submission import JobStatus

    t0 = time.monotonic()
    while not condition():
        status = R.job_details(head, submission_id).status
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), f"job {status} before {what}"
        assert time.monotonic() - t0 < timeout, f"no {what} within {timeout}s"
        time.sleep(0.25)
    subprocess.run([R.RAY, "job", "stop", "--address", head.dashboard_url, submission_id], env=R.cli_env(),
                   capture_output=True, timeout=120)
    while R.job_details(head, submission_id).status not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        assert time.monotonic() - t0 < timeout + 120, f"job {submission_id} did not stop"
        time.sleep(0.5)
    assert R.job_details(head, submission_id).status == JobStatus.STOPPED, f"the job ended on its own before {what}"


def _logs(head, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url).get_job_logs(submission_id)


def test_stop_and_resubmit_resumes_and_matches_undisturbed_run(two_nodes, s3_server, reference_run, tmp_path):
    """Stopped with ``ray job stop`` once in fine-tuning and once in sampling, the same command
    resubmitted twice ends with exactly the undisturbed run's outputs (the reference above, on the
    same cluster and store), and completed stages are reused, not run again: every resume reads
    its checkpoints and partial sets back from the object store."""
    from synthaug import storage
    from synthaug.generative.finetune import latest_step

    head, _ = two_nodes
    assert reference_run["proc"].returncode == 0, (reference_run["proc"].stdout + reference_run["proc"].stderr)[-4000:]
    entrypoint, work_dir, results_dir = _entrypoint(s3_server, "disturbed")
    run = storage.join(work_dir, "tiny")
    src = R.working_dir(tmp_path / "src")
    ids = [f"synthaug-resubmit-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]

    def in_finetune():  # a registered fine-tune checkpoint, and no export yet
        runs = [d for d in storage.list_dirs(storage.join(run, "ray")) if d.startswith("finetune-")]
        return (bool(runs) and latest_step(storage.join(run, "ray", runs[0])) >= 20
                and not storage.exists(storage.join(run, "generators", "finetune", "manifest.json")))

    def in_sampling():  # a set with a plan and some shards, but no manifest
        for s in storage.list_dirs(storage.join(work_dir, "samples")):
            d = storage.join(work_dir, "samples", s)
            names = [i.path.rsplit("/", 1)[-1] for i in storage.list_files(d)]
            if "plan.json" in names and "manifest.json" not in names and any(n.startswith("chunk-") for n in names):
                return True
        return False

    submit = lambda sid: R.submit(head, src, sid, entrypoint, JOB_TIMEOUT_S, no_wait=True)  # noqa: E731
    assert submit(ids[0]).returncode == 0
    _stop_when(head, ids[0], in_finetune, "a fine-tuning checkpoint")
    ingested = _files(storage.join(run, "data"))
    pretrained = _files(storage.join(run, "generators", "pretrain"))
    assert ingested and pretrained

    assert submit(ids[1]).returncode == 0
    _stop_when(head, ids[1], in_sampling, "a partly sampled set")
    second = _logs(head, ids[1])
    assert "[ingest]" in second and "reusing the datasets" in second, second[-4000:]
    assert re.search(r"\[pretrain\] .*reusing the export", second), second[-4000:]
    resumed = re.search(r"\[finetune\] resumed at step (\d+)/160", second)
    assert resumed and int(resumed.group(1)) >= 20, second[-4000:]

    proc = R.submit(head, src, ids[2], entrypoint, JOB_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    third = _logs(head, ids[2])
    for stage in ("pretrain", "finetune"):
        assert re.search(rf"\[{stage}\] .*reusing the export", third), third[-4000:]
    assert re.search(r"\[sample\] .*(resum|reusing)", third), third[-4000:]

    # Completed stages were not redone: their objects are the first submission's, bytes and times.
    assert _files(storage.join(run, "data")) == ingested
    assert _files(storage.join(run, "generators", "pretrain")) == pretrained
    # And the outputs equal the undisturbed run's, by content.
    assert _outputs(work_dir, results_dir) == _outputs(reference_run["work_dir"], reference_run["results_dir"])
