"""The console a user reads, captured to a file as CI or `make demo > log` captures it: synthaug's
own lines, no terminal escape sequences, no Ray Train report lines; `--verbose` brings Ray's back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "jobs/configs/tiny.yaml"


def _cli(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("SYNTHAUG_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-m", "synthaug.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_quiet_log_and_verbose(ray_session, tmp_path):
    """Generator pretraining on two Ray Train workers (one worker is a plain Ray task, with no Train
    lines to hide), with checkpoints, stdout to a pipe."""
    # Both commands join this session's Ray (as under `ray job submit`) rather than start their own:
    # what they print is the same, without two Ray start-ups.
    address = ray_session.get_runtime_context().gcs_address
    base = ["--config", TINY, f"work_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}",
            f"ray.address={address}", "pretrain.steps=4", "pretrain.checkpoint_every=2", "pretrain.num_workers=2"]
    from synthaug import api

    api.ingest(TINY, base[2:])  # in this process: only the two pretraining commands' consoles are read
    quiet = _cli("pretrain", *base)
    assert "[pretrain] step 4/4" in quiet, quiet[-3000:]
    assert "\x1b" not in quiet, [ln for ln in quiet.splitlines() if "\x1b" in ln][:3]
    assert "TrainingReport(" not in quiet and "Checkpoint successfully created" not in quiet
    assert "execution finished" not in quiet  # Ray Data's per-execution INFO lines
    for noise in ("Attempting to start training worker group", "PreemptionWatcher", "Progress bars disabled"):
        assert noise not in quiet, noise  # Train's controller lines, its watcher's error on a local Ray, Data's notice
    verbose = _cli("pretrain", *base, "pretrain.steps=6", "--verbose")  # another key: trained again
    assert "[pretrain] step 6/6" in verbose and "TrainingReport(" in verbose, verbose[-3000:]
    assert "Attempting to start training worker group" in verbose, verbose[-3000:]


def test_quiet_strips_colour_from_rays_start_line():
    from synthaug import console

    console.quiet()
    record = logging.LogRecord("ray._private.worker", logging.INFO, __file__, 1, "dashboard at %s%s%s", (
        "\x1b[1m", "http://127.0.0.1:8265", "\x1b[39m"), None)
    for f in logging.getLogger("ray._private.worker").filters:
        f.filter(record)
    assert record.getMessage() == "dashboard at http://127.0.0.1:8265"
