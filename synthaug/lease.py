"""One live writer per run directory: a lease object with a heartbeat, on any storage.

Every command that writes into ``<work_dir>/<name>/`` (every :meth:`synthaug.api.Checked.run`,
so every stage of the CLI and of the Python API) holds :data:`LEASE` there while it runs.
A second command that finds a live lease refuses at once with one line naming the holder
(host, pid, start time, command); it does not wait. Read-only commands (``--dry-run``,
``estimate``, ``config-reference``) take none.

The lease is a small JSON object written through :mod:`synthaug.storage`, so the same rule
holds on local disk, a shared mount and an object store:

* **Heartbeat.** A daemon thread rewrites the lease every ``SYNTHAUG_LEASE_HEARTBEAT_S``
  seconds (default 5) with the holder's wall-clock time. A lease whose last heartbeat is
  older than ``SYNTHAUG_LEASE_TTL_S`` (default 3 heartbeats) is stale: its holder was
  killed (SIGKILL, a lost node), and the next command takes it over. Hosts sharing a run
  directory need clocks that agree to well within the TTL (NTP).
* **Release.** On every exit of the ``with`` block (success, an error, Ctrl-C) the holder
  deletes its lease, and on SIGTERM (``ray job stop``) before anything else. A process killed
  outright (SIGKILL) leaves it to expire.
* **Creation.** On a local or mounted path the lease is created with ``link(2)`` of a
  complete temporary file, which fails when the lease exists: two commands starting together
  cannot both create it. Object stores (pyarrow) have no create-if-absent, so there a
  command writes its lease, waits ``SYNTHAUG_LEASE_SETTLE_S`` (default 0.5 s) and reads it
  back: the last write stands, and a command that reads back someone else's lease yields
  (refuses). Taking over a stale lease uses the same write, wait, read-back on every storage.
* **Residual race.** Two commands both get through only when one of them reads "no live
  lease", is delayed longer than the settle time, and then writes after the other has read
  back its own lease. The first holder's next heartbeat finds the other's lease and prints a
  warning; nothing stops it. Likewise a holder paused for longer than the TTL (a suspended
  laptop) may be taken over, and its next heartbeat warns.

One process may nest the same lease (``synthaug.api`` calls inside a ``run``): a count,
released when the outermost ``with`` ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from synthaug import storage
from synthaug.errors import InputError

LEASE = ".lease.json"
HEARTBEAT_ENV, TTL_ENV, SETTLE_ENV = "SYNTHAUG_LEASE_HEARTBEAT_S", "SYNTHAUG_LEASE_TTL_S", "SYNTHAUG_LEASE_SETTLE_S"


class RunBusy(InputError):
    """Another live command holds the run directory's lease."""


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InputError(f"environment variable {env}={raw!r} must be a number of seconds > 0")
    return value


def timing() -> tuple[float, float, float]:
    """(heartbeat, TTL, settle) in seconds, from the environment."""
    hb = _seconds(HEARTBEAT_ENV, 5.0)
    return hb, _seconds(TTL_ENV, 3 * hb), _seconds(SETTLE_ENV, 0.5)


def describe(lease: dict) -> str:
    """The holder in words: its command, pid, host and start time."""
    return (f"{lease.get('command', '?')!r} (pid {lease.get('pid', '?')} on {lease.get('host', '?')}, "
            f"started {lease.get('started', '?')})")


def read(run_dir: str) -> dict | None:
    """The lease in ``run_dir`` (None when there is none or it is unreadable)."""
    try:
        d = json.loads(storage.read_bytes(storage.join(run_dir, LEASE)))
    except storage.StorageError:  # an object store's error, in one line naming it
        raise
    except (OSError, ValueError):  # none, or a path the OS refuses (refused, naming it, when the lease is written)
        return None
    return d if isinstance(d, dict) and "token" in d and "heartbeat" in d else None


def is_live(lease: dict | None, ttl: float) -> bool:
    return lease is not None and time.time() - float(lease["heartbeat"]) <= ttl


class Lease:
    """The lease of one run directory, held by this process (see the module docstring)."""

    def __init__(self, run_dir: str, command: str):
        self.run_dir, self.loc = str(run_dir), storage.join(run_dir, LEASE)
        self.heartbeat_s, self.ttl, self.settle = timing()
        self.body = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
                     "command": command, "ttl_s": self.ttl}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Acquiring.

    def _busy(self, holder: dict) -> RunBusy:
        return RunBusy(f"{self.run_dir} is in use by another command: {describe(holder)}; refusing to write into it "
                       f"at the same time (wait for it to end; a killed command's lease expires {self.ttl:g} s after "
                       f"its last heartbeat)")

    def _payload(self) -> bytes:
        return json.dumps({**self.body, "heartbeat": time.time()}).encode()

    def _create_local(self, path: str) -> bool:
        """Create the lease only if absent (``link`` of a complete temporary file); False if it exists."""
        storage.makedirs(self.run_dir)  # a work_dir that cannot be created is refused naming it
        tmp = f"{path}.{self.body['token'][:8]}.tmp"
        storage.write_bytes(tmp, self._payload())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def acquire(self) -> "Lease":
        """Take the lease or raise :class:`RunBusy` naming the live holder."""
        current = read(self.run_dir)
        if is_live(current, self.ttl):
            raise self._busy(current)
        local = storage.local_path(self.loc)
        if local is not None and current is None and not storage.exists(self.loc):
            if self._create_local(str(local)):
                return self._start()
            current = read(self.run_dir)  # someone created it meanwhile
            if is_live(current, self.ttl):
                raise self._busy(current)
        # An object store, or a stale lease to take over: write, let a racing writer land, read back.
        storage.write_bytes(self.loc, self._payload())
        time.sleep(self.settle)
        current = read(self.run_dir)
        if current is None or current["token"] != self.body["token"]:
            raise self._busy(current or {"command": "another command (its lease vanished)"})
        return self._start()

    def _start(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name=f"synthaug-lease {self.run_dir}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        """Refresh the heartbeat while the lease is still ours; warn once and stop if it is not."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = read(self.run_dir)
                if current is None or current["token"] != self.body["token"]:
                    who = describe(current) if current else "nobody (it was deleted)"
                    print(f"synthaug: warning: the lease on {self.run_dir} is now held by {who}; two commands may "
                          f"be writing into it", file=sys.stderr, flush=True)
                    return
                storage.write_bytes(self.loc, self._payload())
            except Exception:  # noqa: BLE001 - storage briefly unreachable: try again next beat
                continue

    # Releasing.

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read(self.run_dir)
        if current is not None and current["token"] == self.body["token"]:
            storage.delete(self.loc)


_HELD: dict[str, list] = {}  # run dir -> [Lease, nesting count], this process's
_LOCK = threading.RLock()  # re-entrant: the SIGTERM handler runs in the main thread, maybe inside held()


def _on_sigterm(previous):
    """A SIGTERM handler that releases this process's leases first (``ray job stop`` sends SIGTERM,
    then SIGKILL 3 s later), then does what the previous handler did."""

    def handler(signum, frame):
        with _LOCK:
            for entry in list(_HELD.values()):
                entry[0].release()
        if callable(previous):
            previous(signum, frame)
        else:
            sys.exit(128 + signum)

    return handler


def _watch_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGTERM)
        if not getattr(current, "_synthaug_lease", False) and current is not signal.SIG_IGN:
            handler = _on_sigterm(current)
            handler._synthaug_lease = True
            signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def held(run_dir: str, command: str):
    """Hold ``run_dir``'s lease for the block (nested holds in one process share it)."""
    key = storage.absolute(run_dir)
    with _LOCK:
        entry = _HELD.get(key)
        if entry is None:
            entry = _HELD[key] = [Lease(key, command).acquire(), 0]
            _watch_sigterm()
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                _HELD.pop(key, None)
                entry[0].release()
