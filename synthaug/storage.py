"""One storage layer: every path is a local path, a mounted path or a URI, through ``pyarrow.fs``.

A *location* is a plain string: ``runs/x`` or ``/mnt/efs/x`` (local or a shared mount),
``s3://bucket/prefix``, ``gs://bucket/prefix``, or any URI that pyarrow (or, failing
that, fsspec) knows. :func:`resolve` turns it into ``(filesystem, path)``; everything
else here is small helpers on top, so stages never call ``open``/``os.replace`` on data.

Object stores have no rename. Writes of single objects are atomic on them (an object
appears only when its upload completes), and on local disk :func:`write_bytes` writes a
temporary sibling and renames it. Datasets therefore commit by writing their manifest
last (see :mod:`synthaug.artifacts`), never by renaming a directory.

S3-compatible endpoints: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. a local
server at ``http://127.0.0.1:8333``); credentials come from the usual AWS chain
(environment, instance profile). The filesystem objects pickle, so Ray tasks on any node
reach the same storage. Every S3 call is bounded: a connection attempt gives up after
``S3_CONNECT_TIMEOUT_S``, a request after ``S3_REQUEST_TIMEOUT_S``, and a call is tried at
most ``S3_MAX_ATTEMPTS`` times, so an unreachable endpoint or bad credentials fail in
seconds, in one line naming the location (:func:`synthaug.errors.object_store_cause`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from synthaug.errors import InputError, object_store_cause


class StorageError(InputError, OSError):
    """A storage location is malformed or unreachable; names the location."""


# ----------------------------------------------------------------------------- resolving


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def _split(location: str) -> tuple[str, str, str]:
    """(scheme, bucket/netloc, key) of a URI."""
    u = urlparse(location)
    return u.scheme, u.netloc, u.path.lstrip("/")


# Bounds on every S3 call: seconds to connect, seconds without a response, tries per call.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_MAX_ATTEMPTS = 3


@functools.lru_cache(maxsize=None)
def _s3(endpoint: str, region: str) -> pafs.FileSystem:
    kwargs: dict[str, Any] = {"allow_bucket_creation": True, "region": region or "us-east-1",
                              "connect_timeout": S3_CONNECT_TIMEOUT_S, "request_timeout": S3_REQUEST_TIMEOUT_S,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=None)
def _other(scheme: str, netloc: str) -> pafs.FileSystem:
    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
        return fs
    except (ValueError, NotImplementedError, OSError):  # not a scheme pyarrow knows: try fsspec
        pass
    try:
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as e:
        raise StorageError(f"{scheme}://{netloc}: no pyarrow or fsspec filesystem for scheme {scheme!r} ({e})") from None


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` of a location; local paths become absolute."""
    s = str(location)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if not is_uri(s):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s))
    scheme, netloc, key = _split(s)
    if not netloc:
        raise StorageError(f"{location}: a {scheme}:// location needs a bucket (e.g. {scheme}://bucket/prefix)")
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        fs = _s3(endpoint, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "")
    else:
        fs = _other(scheme, netloc)
    return fs, posixpath.join(netloc, key).rstrip("/")


def ray_storage(location: str | os.PathLike) -> dict:
    """``RunConfig`` kwargs for Ray Train / Tune storage at ``location`` (shared or cloud)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        return {"storage_path": path}
    return {"storage_path": path, "storage_filesystem": fs}


def local_path(location: str | os.PathLike) -> Path | None:
    """The local (or mounted) path of a location, or None for an object store."""
    fs, path = resolve(location)
    return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None


# ----------------------------------------------------------------------------- names


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for paths and URIs alike."""
    s = str(location)
    if is_uri(s):
        return posixpath.join(s.rstrip("/"), *[str(p).strip("/") for p in parts])
    return os.path.join(s, *[str(p) for p in parts])


def parent(location: str | os.PathLike) -> str:
    s = str(location).rstrip("/")
    if is_uri(s):
        scheme, netloc, key = _split(s)
        return f"{scheme}://{netloc}/{posixpath.dirname(key)}".rstrip("/")
    return os.path.dirname(os.path.abspath(s))


def basename(location: str | os.PathLike) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def absolute(location: str | os.PathLike) -> str:
    """A location that means the same on every node: URIs as they are, local paths absolute."""
    s = str(location)
    return s if is_uri(s) else os.path.abspath(os.path.expanduser(s))


# ----------------------------------------------------------------------------- queries


def info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise _storage_error(location, "cannot reach storage", e) from None


def exists(location: str | os.PathLike) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A directory, or on an object store a prefix with objects under it."""
    return info(location).type == pafs.FileType.Directory


def list_files(location: str | os.PathLike, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files under a directory or prefix (none when it does not exist)."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise _storage_error(location, "cannot list", e) from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def walk_files(location: str | os.PathLike) -> list[pafs.FileInfo]:
    """Every file below a location (path, size, mtime), sorted by path, following symlinks.

    As ``os.walk(followlinks=True)`` (torchvision's ``ImageFolder``), but a directory reached
    again through a link (a cycle, or one tree linked twice) is not walked again, so a link
    loop ends; a dangling link (or one that points to itself) raises naming it. Object
    stores have no links: one recursive listing.
    """
    lp = local_path(location)
    if lp is None:
        return list_files(location)
    paths, seen = [], set()
    for d, dirs, files in os.walk(lp, followlinks=True):
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        paths += [os.path.join(d, f) for f in files]
    infos = pafs.LocalFileSystem().get_file_info(paths)  # follows links; a broken one is NotFound
    for i in infos:
        if i.type == pafs.FileType.NotFound:  # a dangling link, or a link loop: never skipped silently
            try:
                os.stat(i.path)
            except OSError as e:
                raise StorageError(f"{i.path}: broken symbolic link ({e.strerror})") from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def list_dirs(location: str | os.PathLike) -> list[str]:
    """Names of the direct sub-directories (prefixes) of a location."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


# ----------------------------------------------------------------------------- bytes


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such file") from None
    except OSError as e:
        if object_store_cause(e) is None:
            raise
        raise _storage_error(location, "cannot read", e) from None


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_text(location))


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write a whole file atomically: a temporary sibling and a rename locally, one PUT on an object store."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # missing, not a directory, read-only, permission denied, disk full
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"{location}: cannot write it ({e.strerror or e}{_where(e, path)})") from None
    else:
        try:
            with fs.open_output_stream(path) as f:  # the object appears only when the upload completes
                f.write(data)
        except OSError as e:
            raise _storage_error(location, "cannot write it", e) from None
    return str(location)


def write_text(location: str | os.PathLike, text: str) -> str:
    return write_bytes(location, text.encode())


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars, tuples, sets and paths (manifests, records)."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def write_json(location: str | os.PathLike, obj: Any) -> str:
    return write_text(location, json.dumps(obj, indent=2, default=json_default) + "\n")


def makedirs(location: str | os.PathLike) -> None:
    fs, path = resolve(location)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise _storage_error(location, "cannot create it", e) from None


def _storage_error(location, action: str, e: OSError) -> StorageError:
    """One line naming the location: the object store's cause in words, or the OS's reason."""
    return StorageError(f"{location}: {action} ({object_store_cause(e) or e.strerror or str(e).splitlines()[0]})")


def _where(e: OSError, path: str) -> str:
    """`` at <the path the OS refused>`` when that is not the file itself (a parent that is a file, say)."""
    name = getattr(e, "filename", None)
    return f" at {name}" if name and os.path.abspath(str(name)) != os.path.abspath(path) else ""


def delete(location: str | os.PathLike) -> None:
    """Remove a file or a directory tree (a no-op when absent)."""
    fs, path = resolve(location)
    t = fs.get_file_info(path).type
    if t == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif t == pafs.FileType.File:
        fs.delete_file(path)


# ----------------------------------------------------------------------------- trees


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Copy a local directory tree to a location (files in ``skip`` are left out, to be written last)."""
    fs, path = resolve(location)
    local_dir = Path(local_dir)
    for f in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name not in skip):
        dst = posixpath.join(path, f.relative_to(local_dir).as_posix()) if not isinstance(
            fs, pafs.LocalFileSystem) else os.path.join(path, str(f.relative_to(local_dir)))
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(f, dst)
        else:
            with fs.open_output_stream(dst) as out, open(f, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)


def download_dir(location: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy a directory tree from a location to a local directory."""
    fs, path = resolve(location)
    local_dir = Path(local_dir)
    for i in list_files(location):
        rel = i.path[len(path):].lstrip("/")
        dst = local_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(i.path) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    return local_dir


def cache_root() -> Path:
    """Where object-store trees (generators, bases) are copied to be read by local-only libraries."""
    return Path(os.environ.get("SYNTHAUG_CACHE", os.path.join(tempfile.gettempdir(), "synthaug-cache")))


def localize(location: str | os.PathLike, key: str | None = None) -> Path:
    """A local directory with the tree at ``location``: itself if local, else a cached download.

    ``key`` (a content hash) names the cache entry, so a changed tree is never served stale.
    """
    lp = local_path(location)
    if lp is not None:
        return lp
    import hashlib

    if not key:  # no content key: a private fresh copy (a shared one could be stale)
        return download_dir(location, cache_root() / f"{hashlib.sha256(str(location).encode()).hexdigest()[:16]}-"
                                                      f"{uuid.uuid4().hex[:8]}")
    dst = cache_root() / key
    if (dst / ".complete").is_file():
        return dst
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
    download_dir(location, tmp)
    (tmp / ".complete").write_text(str(location))
    try:
        os.replace(tmp, dst)  # atomic; fails if another process got there first
    except OSError:
        if not (dst / ".complete").is_file():  # a half copy left by a killed process: replace it
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
        else:  # another process (an actor on this node) finished the same copy: use it, never delete it
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
