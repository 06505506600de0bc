"""The console a user reads: synthaug's own lines, Ray's warnings and errors; the rest with --verbose.

By default (no ``--verbose``, ``SYNTHAUG_VERBOSE`` unset), in the driver and in every worker:

- Ray's INFO chatter goes to its log files only: Train's per-report ("Reporting training
  result ... TrainingReport(...)") and per-checkpoint lines, its controller's worker-group
  lines (:func:`train_logging`), Ray Data's per-execution lines, the local cluster's
  start-up line;
- when stdout is not a terminal (a log file, CI, ``ray job submit``), Ray Data's progress
  bars are off (their cursor-control sequences make a log unreadable) and worker lines
  carry no colour codes; each stage prints its own one-line progress with counts and time;
- Tune's console table is off (the sweep prints its summary), and so are tensorboardX's
  "NaN or Inf" warnings about the metrics reported before a run's first evaluation.

``--verbose`` (``SYNTHAUG_VERBOSE=1``, which travels to the workers) keeps everything as
Ray prints it.
"""

from __future__ import annotations

import logging
import os
import re
import sys

VERBOSE_ENV = "SYNTHAUG_VERBOSE"
QUIET_LOGGERS = ("ray.tune", "ray.air", "ray.train._internal.storage")  # the last: a Tune trial's checkpoint lines
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def terminal() -> bool:
    return sys.stdout.isatty()


def quiet() -> None:
    """Ray's INFO lines off this process's console (driver or worker), unless verbose."""
    if verbose():
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("tensorboardX").setLevel(logging.ERROR)
    # Ray Data and Ray Train log DEBUG to their own files: only their console handlers are raised.
    # Ray Data creates its handlers when it is first imported: import it first, or an import after
    # this call would bring fresh INFO handlers back.
    import ray.data  # noqa: F401

    for name in ("ray.data", "ray.train"):
        for h in logging.getLogger(name).handlers:
            if "File" not in type(h).__name__:
                h.setLevel(logging.WARNING)
    # Ray Data warns once that its bars are off, which is what quiet asks for: not a warning here.
    bars = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _NoBarsNotice) for f in bars.filters):
        bars.addFilter(_NoBarsNotice())
    # Tune's console output (the experiment box, "View detailed results here") prints whatever the
    # RunConfig's verbose says under its new output engine; its legacy engine honours verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's advice to snapshot its experiment state less often: a sweep of short trials always
    # triggers it, and nothing in synthaug's config could act on it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not terminal():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        start = logging.getLogger("ray._private.worker")  # "View the dashboard at <bold green URL>"
        if not any(isinstance(f, _NoAnsi) for f in start.filters):
            start.addFilter(_NoAnsi())


class _NoAnsi(logging.Filter):
    """Drops terminal colour codes from a record's arguments (for logs that are files)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(ANSI.sub("", a) if isinstance(a, str) else a for a in record.args)
        return True


def train_logging():
    """Ray Train's ``LoggingConfig``: its controller's and workers' INFO lines (resource requests,
    worker-group start, process-group set-up) only when verbose; warnings and errors always."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


class _NoBarsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def progress_bars() -> bool:
    """Whether Ray Data should draw progress bars: on a terminal, or when verbose."""
    return verbose() or terminal()


def worker_env() -> dict:
    """Settings the workers need to be as quiet as the driver (for the runtime env)."""
    keys = (VERBOSE_ENV, "RAY_COLOR_PREFIX")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}
