"""A real MLflow tracking server on 127.0.0.1 for the tests (``mlflow server``: SQLite store, proxied
artifacts, all under one directory), started in its own process group and stopped by it (by PID)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


class MlflowServer:
    """``mlflow server`` with a SQLite store and proxied artifacts, all under ``root``."""

    def __init__(self, root: Path):
        import s3server

        self.port = s3server.free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow.log"
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process
        with open(self.log, "wb") as log:
            # Its own process group: `mlflow server` runs uvicorn as a child, and both are stopped together.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)

    def wait(self, timeout_s: float = 240.0) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return self.uri
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow server did not answer /health within {timeout_s:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
