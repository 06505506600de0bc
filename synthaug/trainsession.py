"""Where a training loop runs, and what it reports through: one small class for every loop.

A loop (the classifier's, the generator's) is one function that may run as

* ``"train"``: a Ray Train worker, one of 1 or N (``ray.train.*``; DDP through
  ``ray.train.torch.prepare_model``);
* ``"tune"``: a Ray Tune trial's own process (``ray.tune.*``, as Ray 2.x requires inside
  a Tune function);
* ``"task"``: one worker in a plain Ray task (:func:`run_task`), checkpoints in the run's storage
  (:class:`synthaug.checkpoints.TaskCheckpoints`). Ray's advice for one worker: no Train
  controller, worker group or process group to start for every run;
* ``"local"``: in this process, no Ray session (reports are only returned, nothing is saved).

The loop asks the session for its rank, device, latest checkpoint and where to report; it
never imports ``ray.train`` or ``ray.tune`` itself.
"""

from __future__ import annotations

KINDS = ("train", "tune", "task", "local")


def run_task(loop, config: dict, run_loc: str, *, name: str, num_cpus: float, use_gpu: bool, max_retries: int):
    """Run ``loop(config)`` as one worker in one Ray task, its checkpoints at ``run_loc``.

    The loop sees the ``"task"`` kind (``config["_reporter"]``, ``config["_run_loc"]``). A task
    whose process or node dies is run again (``max_retries`` times) and resumes from the latest
    checkpoint, as a re-run does. Returns what the loop returned and the run's
    :class:`~synthaug.checkpoints.TaskCheckpoints`.
    """
    import ray

    from synthaug.checkpoints import TaskCheckpoints

    task = ray.remote(loop).options(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0, max_retries=max_retries, name=name)
    out = ray.get(task.remote({**config, "_reporter": "task", "_run_loc": run_loc}))
    return out, TaskCheckpoints(run_loc)


class TrainSession:
    """Rank, device, checkpoints and reports for a loop running as ``kind`` (one of :data:`KINDS`).

    ``run_loc``: the run's location, where a ``"task"`` keeps its checkpoints.
    ``use_gpu``: outside Ray Train (which picks the device), use CUDA when it is there.
    """

    def __init__(self, kind: str, run_loc: str | None = None, use_gpu: bool = False):
        import torch

        if kind not in KINDS:
            raise ValueError(f"_reporter must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        self.kind = kind
        self.store = None
        if kind == "task":
            from synthaug.checkpoints import TaskCheckpoints

            self.store = TaskCheckpoints(run_loc)
        if kind == "train":
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
        else:
            self.rank, self.world_size = 0, 1
            self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def prepare_model(self, model):
        """The model on this worker's device (wrapped in DDP under Ray Train with several workers)."""
        if self.kind == "train":
            import ray.train.torch

            return ray.train.torch.prepare_model(model)
        return model.to(self.device)

    def get_checkpoint(self):
        """The checkpoint to resume from (anything with ``as_directory()``), or None."""
        if self.kind == "train":
            import ray.train

            return ray.train.get_checkpoint()
        if self.kind == "tune":
            import ray.tune

            return ray.tune.get_checkpoint()
        if self.kind == "task":
            return self.store.latest_checkpoint()
        return None

    @property
    def saves_checkpoints(self) -> bool:
        return self.kind != "local" and self.rank == 0

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Report ``metrics``, with the local directory ``checkpoint_dir`` as a checkpoint when given."""
        if self.kind == "train":
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
        elif self.kind == "tune":
            import ray.tune

            ckpt = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.tune.report(metrics, checkpoint=ckpt)
        elif self.kind == "task" and checkpoint_dir:
            self.store.save(checkpoint_dir, metrics)
