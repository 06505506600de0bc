"""A one-worker run's checkpoints in its run's storage (no torch, no Ray imports).

``classify.train.fit`` and ``generative.finetune.run`` run one worker as a plain Ray task
(the ``"task"`` kind of :class:`synthaug.trainsession.TrainSession`); its checkpoints live at
the run location, on any storage, beside the run's ``artifact.json``. The layout and the
commit rule are those of the dataset contract: the files first, a small pointer last.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager

from synthaug import storage


class TaskCheckpoints:
    """A one-worker run's checkpoints at its run location (any storage), for the ``"task"`` session.

    ``checkpoint_<n>/`` (n counts the saves) holds what the loop wrote; ``latest_checkpoint.json``
    names the newest complete one and is written after its files, so a checkpoint whose upload
    was cut off is never read (the manifest rule). The two newest are kept, as Ray Train keeps them.
    """

    POINTER = "latest_checkpoint.json"
    KEEP = 2

    def __init__(self, run_loc: str):
        self.run_loc = run_loc

    def _pointer(self) -> dict | None:
        loc = storage.join(self.run_loc, self.POINTER)
        return storage.read_json(loc) if storage.is_file(loc) else None

    def latest_metrics(self) -> dict:
        """The metrics reported with the newest checkpoint ({} when none): what a run restarted
        after its last checkpoint returns, having nothing left to train."""
        p = self._pointer()
        return {} if p is None else dict(p["metrics"])

    def save(self, local_dir: str, metrics: dict) -> None:
        """Commit a local checkpoint directory reported with ``metrics``."""
        p = self._pointer()
        index = 1 if p is None else int(p.get("index", p["path"].rsplit("_", 1)[-1])) + 1
        name = f"checkpoint_{index:06d}"
        storage.upload_dir(local_dir, storage.join(self.run_loc, name))
        storage.write_json(storage.join(self.run_loc, self.POINTER), {"path": name, "index": index, "metrics": metrics})
        old = sorted(d for d in storage.list_dirs(self.run_loc) if d.startswith("checkpoint_"))[:-self.KEEP]
        for d in old:
            storage.delete(storage.join(self.run_loc, d))

    def latest_checkpoint(self) -> "StoredCheckpoint | None":
        """The newest complete checkpoint, or None."""
        p = self._pointer()
        return None if p is None else StoredCheckpoint(storage.join(self.run_loc, p["path"]))


class StoredCheckpoint:
    """A checkpoint directory at a storage location, with the ``as_directory()`` of a Ray Train checkpoint."""

    def __init__(self, loc: str):
        self.loc = loc

    @contextmanager
    def as_directory(self):
        """A local directory with the checkpoint (itself, or a temporary download)."""
        local = storage.local_path(self.loc)
        if local is not None:
            yield str(local)
            return
        with tempfile.TemporaryDirectory() as d:
            yield str(storage.download_dir(self.loc, d))
