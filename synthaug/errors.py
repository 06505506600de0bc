"""Errors caused by the user's input, and how to find one behind Ray's wrappers.

An :class:`InputError` means the input is wrong (a file, key, value or path); the CLI
prints one line ``synthaug <stage>: error: <message>`` and exits with code 2. Anything
else is an internal error and keeps its traceback.

Some causes are recognised by their class, wherever they are raised (see
:func:`by_class`): an ``OSError`` on a path the user gave (missing, not a directory,
read-only, permission denied, disk full, name too long, a link loop), and an object
store's error (endpoint unreachable, bucket missing, access denied, bad credentials),
which pyarrow reports only as text.

Errors raised inside Ray tasks, actors and Train workers reach the driver wrapped
(``RayTaskError.cause``, Train's worker-failure dicts, or only as text), so
:func:`find_input_error` looks through all of those.
"""

from __future__ import annotations

import errno
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


# OSError numbers that a user's location or environment causes, not a bug.
USER_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM,
                         errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG, errno.ELOOP})

# pyarrow's S3 error texts (AWS SDK error names and curl's words) -> what the user reads.
_S3_CAUSES = (
    (r"NETWORK_CONNECTION|Could(?: no|n')t connect|Couldn't resolve host|Connection refused|Timeout was reached"
     r"|Operation timed out|curlCode: (?:6|7|28)\b", "endpoint unreachable (check AWS_ENDPOINT_URL and the network)"),
    (r"NoSuchBucket|NO_SUCH_BUCKET|bucket does not exist", "bucket missing"),
    (r"InvalidAccessKeyId|INVALID_ACCESS_KEY_ID|SignatureDoesNotMatch|SIGNATURE_DOES_NOT_MATCH|ExpiredToken"
     r"|InvalidToken|No credentials|Unable to parse ExceptionName: InvalidAccessKeyId",
     "bad credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
    (r"ACCESS_DENIED|AccessDenied|Access Denied|HTTP (?:response code|status):? 403", "access denied (check the credentials and the bucket's permissions)"),
)
_S3_WHERE = re.compile(r"(?:key '([^']*)' in )?bucket '([^']+)'")


def object_store_cause(e: BaseException) -> str | None:
    """What went wrong, in words, when ``e`` is an object store's (pyarrow S3) error; else None."""
    text = str(e)
    if "AWS Error" not in text and "curlCode" not in text:
        return None
    for pattern, cause in _S3_CAUSES:
        if re.search(pattern, text):
            return cause
    return None


def _object_store_location(text: str) -> str:
    """``s3://bucket/key`` named in a pyarrow S3 error's text ('' when it names none)."""
    m = _S3_WHERE.search(text)
    return f"s3://{m.group(2)}/{m.group(1) or ''}".rstrip("/") if m else ""


def by_class(e: BaseException) -> InputError | None:
    """An InputError for an exception whose class says the user's location or storage caused it, or None."""
    cause = object_store_cause(e)
    if cause is not None:
        where = _object_store_location(str(e)) or "object store"
        return InputValueError(f"{where}: {cause}")
    if isinstance(e, OSError) and e.errno in USER_ERRNOS and e.filename:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else f"{e.filename}"
        return InputValueError(f"{where}: {e.strerror or errno.errorcode.get(e.errno, e.errno)}")
    return None


def find_input_error(exc: BaseException) -> InputError | None:
    """The InputError behind ``exc`` (itself, a cause, a Ray worker's error, an error of a user's class), or None."""
    for e in _iter(exc):
        if isinstance(e, InputError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, InputError):
                return cause  # Ray's RayTaskError(<cls>) is an instance of the cause's class too
            if type(e).__module__.startswith("ray"):
                return InputValueError(_message(e))
            return e
    for e in _iter(exc):
        found = by_class(e)
        if found is not None:
            return found
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
