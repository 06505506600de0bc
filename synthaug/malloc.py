"""Hand freed heap memory back to the OS in long-running worker processes (glibc ``malloc_trim``).

A classifier worker or a feature actor allocates and frees batches of decoded images many
times a second, from Ray Data's prefetch threads and the compute thread. glibc keeps what
they free in its heaps, fragmented, so a process's private memory grew with the size of
the run rather than with what it holds. ``malloc_trim(0)`` returns the free pages of every
heap (``madvise``) without moving anything live.

Measured here (``ray::classify``, one epoch of the scale benchmark's classifier on 10k and
40k images of 32 px, peak private MB; glibc's default arenas): 803 -> 883 without trimming,
786 -> 844 trimming every 16 batches, at the same speed (43 s at 10k either way). Trimming
every batch was flatter still at 10k (682) but 40% slower: each trim makes the next batch
fault its pages back in. A fixed ``MALLOC_TRIM_THRESHOLD_`` (trim on every ``free``) cost
the same. The README's scale benchmark has the figures at every N.

``SYNTHAUG_MALLOC_TRIM_EVERY`` sets the interval (0: never); ``init_ray`` passes it to the
workers. Outside glibc (macOS, musl) ``trim`` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from synthaug.errors import InputValueError

TRIM_ENV = "SYNTHAUG_MALLOC_TRIM_EVERY"
EVERY = 16  # batches between trims in a loop, unless TRIM_ENV says otherwise


def interval() -> int:
    """Batches between trims: ``SYNTHAUG_MALLOC_TRIM_EVERY`` (0: never), else ``EVERY``."""
    raw = os.environ.get(TRIM_ENV, str(EVERY))
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise InputValueError(f"environment variable {TRIM_ENV}={raw!r}: expected an integer >= 0 "
                              f"(batches between malloc trims; 0 = never)")
    return n


@functools.cache
def _load():
    """glibc's ``malloc_trim``, or False where there is none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Return free heap pages to the OS; True if glibc released any."""
    fn = _load()
    return bool(fn(0)) if fn else False


class Trimmer:
    """Call ``trim`` once every ``every`` ticks: ``tick()`` in a loop body."""

    def __init__(self, every: int | None = None):
        self.every, self.n = interval() if every is None else int(every), 0

    def tick(self) -> None:
        self.n += 1
        if self.every > 0 and self.n % self.every == 0:
            trim()
