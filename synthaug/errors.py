"""Errors caused by the user's input, and how to find one behind Ray's wrappers.

An :class:`InputError` means the input is wrong (a file, key, value or path); the CLI
prints one line ``synthaug <stage>: error: <message>`` and exits with code 2. Anything
else is an internal error and keeps its traceback.

Errors raised inside Ray tasks, actors and Train workers reach the driver wrapped
(``RayTaskError.cause``, Train's worker-failure dicts, or only as text), so
:func:`find_input_error` looks through all of those.
"""

from __future__ import annotations

import re


class InputError(Exception):
    """The user's input is wrong; the CLI prints one line and exits 2."""


class InputNotFound(InputError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class InputValueError(InputError, ValueError):
    """A value the user gave (an option, a dataset's content) cannot be used."""


# The InputError classes, by name, for errors that reach the driver only as text.
INPUT_ERROR_NAMES = ("InputError", "InputNotFound", "InputValueError", "ConfigError", "DatasetError",
                     "GeneratorError", "StorageError", "ExtractorError")


def _children(e: BaseException) -> list:
    """The exceptions an exception wraps: chained ones, Ray's cause, Train's worker failures."""
    out = [e.__cause__, e.__context__, getattr(e, "cause", None)]
    for attr in ("worker_failures", "_worker_failures", "errors"):
        v = getattr(e, attr, None)
        if isinstance(v, dict):
            out.extend(v.values())
        elif isinstance(v, (list, tuple)):
            out.extend(v)
    for attr in ("error", "_error", "training_error", "worker_group_error"):
        out.append(getattr(e, attr, None))
    return [c for c in out if isinstance(c, BaseException)]


def _message(e: BaseException) -> str:
    """An error's message without Ray's traceback text around it."""
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return text
    m = _LINE.search(lines[-1].strip())
    return m.group(2).strip() if m else lines[-1].strip()


_LINE = re.compile(r"(?:^|[\s.:(])(\w+Error|InputNotFound): (.+)$")


def find_input_error(exc: BaseException) -> InputError | None:
    """The InputError behind ``exc`` (itself, a cause, a Ray worker's error), or None."""
    for e in _iter(exc):
        if isinstance(e, InputError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, InputError):
                return cause  # Ray's RayTaskError(<cls>) is an instance of the cause's class too
            if type(e).__module__.startswith("ray"):
                return InputValueError(_message(e))
            return e
    # Last resort: only the text survived (a worker's traceback, formatted).
    for e in _iter(exc):
        for line in reversed(str(e).splitlines()):
            m = _LINE.search(line.strip())
            if m and m.group(1) in INPUT_ERROR_NAMES:
                return InputValueError(m.group(2).strip())
    return None


def _iter(exc: BaseException):
    """``exc`` and every exception reachable from it (causes, contexts, Ray's wrapped errors), breadth first, once each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(_children(e))


def first_line(e: BaseException) -> str:
    """The one line the CLI prints for an input error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
