"""Run directories cannot collide (``synthaug.lease``), and locations are resolved by the driver.

Two real processes on local disk and on the S3 server: a holder keeps a run directory's
lease (heartbeat every 0.5 s, TTL 3 s here), the real CLI on the same run directory is
refused with one line naming the holder, and after the holder is killed with SIGKILL its
lease blocks until the TTL has passed, when a new command takes the directory over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthaug import lease, storage

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")
FAST = {lease.HEARTBEAT_ENV: "0.5", lease.TTL_ENV: "3", lease.SETTLE_ENV: "0.2"}
# A command that holds a run directory's lease for argv[3] seconds, then exits normally.
HOLD = ("import sys, time\nfrom synthaug.lease import held\nwith held(sys.argv[1], sys.argv[2]):\n"
        "    print('held', flush=True)\n    time.sleep(float(sys.argv[3]))\n")


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **FAST, **extra}
    env.pop("SYNTHAUG_DEBUG", None)
    return env


def _hold(run_dir: str, command: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, run_dir, command, str(seconds)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_command_refused_and_stale_lease_taken_over(storage_root, monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    work = storage.join(storage_root, "work")
    run_dir = storage.join(work, "tiny")  # the tiny config's run directory
    holder = _hold(run_dir, "synthaug run (the holder)", 600)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        time.sleep(2 * 3.0)  # twice the TTL: only the heartbeat keeps the lease live

        # The real CLI on the same run directory: one line naming the holder, exit 2, nothing written.
        proc = subprocess.run([sys.executable, "-m", "synthaug.cli", "ingest", "--config", TINY, f"work_dir={work}",
                               f"results_dir={storage.join(storage_root, 'results')}"],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "is in use by another command: 'synthaug run (the holder)'" in lines[0], lines[0]
        assert f"pid {holder.pid} on " in lines[0] and "started " in lines[0], lines[0]
        assert [storage.basename(i.path) for i in storage.list_files(run_dir)] == [lease.LEASE]

        # Killed outright, the holder cannot release: its lease still refuses until the TTL has passed.
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        last = lease.read(run_dir)
        assert last is not None and last["pid"] == holder.pid
        with pytest.raises(lease.RunBusy, match=f"pid {holder.pid} "):
            lease.Lease(run_dir, "too early").acquire()
        time.sleep(max(0.0, float(last["heartbeat"]) + 3.0 + 0.5 - time.time()))
        second = _hold(run_dir, "the next command", 0)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0 and out.strip() == "held", err
        assert lease.read(run_dir) is None  # released when it ended
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)


def test_released_on_error_and_interrupt_and_nested(tmp_path, monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    run_dir = str(tmp_path / "run")
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc):
            with lease.held(run_dir, "x"):
                assert lease.read(run_dir)["pid"] == os.getpid()
                raise exc()
        assert lease.read(run_dir) is None
    with lease.held(run_dir, "outer"):
        with lease.held(run_dir, "inner"):  # the same process nests its own lease
            pass
        assert lease.read(run_dir)["command"] == "outer"  # still held by the outer block
    assert lease.read(run_dir) is None


def test_released_on_sigterm(tmp_path):
    """``ray job stop`` sends SIGTERM (and SIGKILL 3 s later): the lease goes at once, so the job
    can be submitted again straight away."""
    run_dir = str(tmp_path / "run")
    holder = _hold(run_dir, "stopped", 600)
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    assert lease.read(run_dir)["pid"] == holder.pid
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(30) == 128 + signal.SIGTERM
    assert lease.read(run_dir) is None


def test_lease_timing_from_the_environment(monkeypatch):
    monkeypatch.setenv(lease.HEARTBEAT_ENV, "2")
    monkeypatch.delenv(lease.TTL_ENV, raising=False)
    assert lease.timing()[:2] == (2.0, 6.0)  # TTL: three heartbeats
    monkeypatch.setenv(lease.TTL_ENV, "soon")
    with pytest.raises(lease.InputError, match=lease.TTL_ENV):
        lease.timing()


# ----------------------------------------------------------------------------- locations


def test_relative_locations_resolved_once_by_the_driver(tmp_path, monkeypatch):
    from synthaug import api
    from synthaug.config import dump_config, load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    cfg = api.load(TINY, ["work_dir=w", "results_dir=r", "ingest.path=imgs", "finetune.base=org/hub-model",
                          "classify.kd_teacher=t1, s3://b/t2", "classify.added_batch=4"])
    assert (cfg.work_dir, cfg.results_dir, cfg.ingest.path) == (str(tmp_path / "w"), str(tmp_path / "r"),
                                                                str(tmp_path / "imgs"))
    assert cfg.finetune.base == "org/hub-model"  # a hub id (no such local path) stays one
    assert cfg.classify.kd_teacher == f"{tmp_path / 't1'},s3://b/t2"
    # The record of the run says the same, wherever it is read from.
    dumped = load_config(dump_config(cfg, tmp_path / "rec"))
    assert dumped.work_dir == str(tmp_path / "w")
    checked = api.check("ingest", cfg)
    assert api.P.RunPaths(checked.config).work == str(tmp_path / "w" / "tiny")


def test_local_work_dir_refused_on_more_than_one_node():
    from synthaug.config import load_config
    from synthaug.errors import InputValueError
    from synthaug.raylocal import check_shared_locations

    node = {"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0}}
    one, two = [node], [node, {**node, "NodeID": "b"}]
    local = load_config(None, ["work_dir=/data/runs", "results_dir=s3://bucket/results"])
    check_shared_locations(local, one)
    check_shared_locations(local, [*one, {**node, "NodeID": "dead", "Alive": False}])  # a dead node is no node
    with pytest.raises(InputValueError, match=r"^config key 'work_dir': /data/runs is a local path, but the Ray "
                                              r"cluster has 2 nodes.*s3://.*shared_mount=true"):
        check_shared_locations(local, two)
    check_shared_locations(load_config(None, ["work_dir=/data/runs", "shared_mount=true"]), two)
    check_shared_locations(load_config(None, ["work_dir=s3://b/w", "results_dir=gs://b/r"]), two)
    with pytest.raises(InputValueError, match="'results_dir'"):
        check_shared_locations(load_config(None, ["work_dir=s3://b/w", "results_dir=/r"]), two)


def test_one_node_cluster_accepts_a_relative_work_dir(ray_session, tmp_path):
    """The CLI joins a running one-node Ray (RAY_ADDRESS), checks it, and writes under the
    driver's absolute resolution of a relative work_dir; the lease is gone afterwards."""
    import yaml

    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "synthaug.cli", "ingest", "--config", TINY, "work_dir=w",
                           "results_dir=r"], cwd=tmp_path, env=_env(RAY_ADDRESS=address), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = yaml.safe_load((tmp_path / "w" / "tiny" / "config.ingest.yaml").read_text())
    assert record["work_dir"] == str(tmp_path / "w") and record["results_dir"] == str(tmp_path / "r")
    assert not (tmp_path / "w" / "tiny" / lease.LEASE).exists()
