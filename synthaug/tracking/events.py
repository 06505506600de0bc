"""TensorBoard event files of synthaug.tracking, at any storage location."""

from __future__ import annotations

import shutil
import tempfile

from synthaug import storage


class _Events:
    """A SummaryWriter at a location: written in place when local, else in a local directory
    uploaded to the location on close."""

    def __init__(self, location: str):
        self.location = location
        self.local = storage.local_path(location)
        self.staging = None if self.local is not None else tempfile.mkdtemp(prefix="synthaug-tb-")
        self.writer = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.local or self.staging))
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.staging is not None:
            storage.upload_dir(self.staging, self.location)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
