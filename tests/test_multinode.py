"""A two-node Ray cluster on this machine, as users run synthaug: ``ray job submit`` to a CPU-less head.

The head is ``ray start --head --num-cpus=0`` (like cluster.yaml's head); a second node
joins with ``ray start --address ...`` and holds every CPU. Each node has its own temp dir
and ports on 127.0.0.1 (:mod:`raycli`). The tiny pipeline is submitted with
``ray job submit --working-dir .`` exactly as the README says, with ``work_dir`` and
``results_dir`` on the local S3-compatible server; this is CI's run of the whole tiny
pipeline on S3, so its outputs are checked in full (``test_pipeline.check_run_outputs``). Every task and Train worker must land
on the second node (the head has no CPUs), so nothing may depend on the driver's local
disk or working directory. Only the processes this test started are stopped, by PID.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
import warnings

import pytest

import raycli as R
from test_pipeline import FAST, check_run_outputs

JOB_TIMEOUT_S = 1500


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


def test_pipeline_job_on_cpu_less_head_and_worker_node(two_nodes, s3_server, tmp_path):
    from synthaug import artifacts, storage

    head, _ = two_nodes
    work_dir, results_dir = s3_server.root("twonode-runs"), s3_server.root("twonode-results")
    submission_id = f"synthaug-2node-{uuid.uuid4().hex[:8]}"
    entrypoint = [sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/tiny.yaml",
                  f"work_dir={work_dir}", f"results_dir={results_dir}", *FAST]
    t0 = time.monotonic()
    proc = R.submit(head, R.working_dir(tmp_path / "src"), submission_id, entrypoint, JOB_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    print(f"two-node job took {time.monotonic() - t0:.0f}s")
    assert proc.returncode == 0, out[-8000:]
    assert R.job_details(head, submission_id).status == "SUCCEEDED"

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
