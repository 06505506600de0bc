"""Content-addressed identity: one function keys every trained or computed artifact.

A key hashes two things: the config fields that change the result (a section's fields
minus the ones listed in :data:`NOT_RESULT`, which only change how or where the work
runs) and the content hashes of the inputs (datasets' ``content_hash``, generators'
``weights_hash``, bases' tree hashes, a mixture's plan). The same key reuses or resumes
an artifact; a different key starts a new one. Stages name their Ray Train / Tune runs
``<label>-<key[:12]>`` and write :data:`RECORD` beside each artifact with its key, its
inputs and its resolved config, so a run directory says which artifact came from what.

    key = artifact_key("classify", config_fields("classify", cfg.classify), {"val": h1, "train": h2}, seed=0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from synthaug import storage

RECORD = "artifact.json"  # the record beside a Ray Train run, a classifier export or a sweep
KEY_VERSION = 3  # 3: seeded row keys from keys.row_keys (mixtures, subsets, sample seeds); 2: trainers read through a buffer sized from the data, writers mix classes; bump when what a key covers changes: old artifacts then stop matching

# Config fields that do not change an artifact's content (only retries, reporting, caching or placement).
NOT_RESULT: dict[str, frozenset] = {
    "ingest": frozenset({"chunk_size"}),
    "train_gen": frozenset({"max_failures", "checkpoint_every", "val_grid_every", "cache", "use_gpu",
                            "gradient_checkpointing", "data", "extra_data"}),  # data: by content, in the inputs
    # cpus_per_worker (torch threads) changes the last digits: in the key as `threads`, only when not 1.
    "classify": frozenset({"max_failures", "checkpoint_every", "cache", "seeds", "use_gpu", "kd_teacher",
                           "cpus_per_worker"}),
    "evaluate": frozenset({"batch_size", "min_actors", "max_actors", "num_gpus_per_actor", "near_copy_chunk"}),
    # Whether the baseline runs and how inference is placed; the selection (select, threshold or
    # top_fraction) and the teacher (teacher_seed, through the teacher's own key) change the set.
    "pseudolabel": frozenset({"enabled", "with_synthetic", "batch_size", "min_actors", "max_actors",
                              "num_gpus_per_actor", "teacher_seed"}),
}


def config_fields(kind: str, section: Any) -> dict:
    """The fields of a config section that change the result, as a JSON-able dict."""
    from synthaug.config import to_dict

    d = to_dict(section) if dataclasses.is_dataclass(section) else dict(section)
    return {k: v for k, v in sorted(d.items()) if k not in NOT_RESULT.get(kind, frozenset())}


def artifact_key(stage: str, fields: dict, inputs: dict[str, Any], **extra: Any) -> str:
    """The sha256 (hex) of a stage's result-changing config ``fields``, its ``inputs``' content hashes and ``extra``."""
    blob = json.dumps({"v": KEY_VERSION, "stage": stage, "config": fields, "inputs": inputs, "extra": extra},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_name(label: str, key: str) -> str:
    """The name of a keyed Ray Train / Tune run: ``<label>-<first 12 hex of the key>``."""
    return f"{label}-{key[:12]}"


def dataset_hash(location: str) -> str:
    """A contract dataset's content hash (from its manifest; an incomplete location raises)."""
    from synthaug.artifacts import read_manifest

    return str(read_manifest(location)["content_hash"])


def write_record(location: str, stage: str, key: str, inputs: dict, config: dict, **more: Any) -> str:
    """Write :data:`RECORD` (key, inputs, resolved config) into ``location``; returns its path."""
    from synthaug.artifacts import atomic_write_json

    return atomic_write_json(storage.join(location, RECORD),
                             {"stage": stage, "key": key, "inputs": inputs, "config": config, **more})


def read_record(location: str, filename: str = RECORD) -> dict | None:
    """The record (or another JSON ``filename``) in ``location``, or None when there is none or it is unreadable."""
    path = storage.join(location, filename)
    if not storage.is_file(path):
        return None
    try:
        return storage.read_json(path)
    except (ValueError, OSError):
        return None


def reuse(location: str, key: str, stage: str, noun: str) -> dict | None:
    """The manifest of the complete artifact at ``location`` when it carries ``key``, else None.

    The one "reuse the output when it is complete with the same key" of the manifest-written
    stages: a reuse prints one line (``[<stage>] <location>: reusing <noun> (same key ...)``)
    and tags the tracked run with the artifact's identity (``tracking.reused``), not a copy.
    """
    from synthaug import tracking
    from synthaug.artifacts import is_complete, read_manifest

    if not is_complete(location):
        return None
    m = read_manifest(location)
    if m.get("key") != key:
        return None
    print(f"[{stage}] {location}: reusing {noun} (same key {key[:12]})", flush=True)
    tracking.reused(stage, key, str(location))
    return m


def keyed_record(location: str, key: str, filename: str = RECORD) -> dict | None:
    """The record (or a manifest-like JSON ``filename``) in ``location`` when its ``key`` is ``key``, else None."""
    rec = read_record(location, filename)
    return rec if rec is not None and rec.get("key") == key else None


def matches(location: str, key: str, filename: str = RECORD) -> bool:
    """True when ``location`` holds a record (or a manifest-like JSON ``filename``) whose ``key`` is ``key``."""
    return keyed_record(location, key, filename) is not None
