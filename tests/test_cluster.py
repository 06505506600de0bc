"""cluster.yaml against Ray's own autoscaler schema, offline and without cloud credentials.

``ray up`` runs ``prepare_config`` (merge the provider's defaults.yaml) and then
``validate_config`` (jsonschema against ray/autoscaler/ray-schema.json plus a few
cross-field checks) before it touches the cloud; we run the same two calls. The
provider's ``bootstrap_config`` (IAM roles, key pairs, subnets) needs AWS and is not run.

Ray's schema closes the top level, ``auth`` and each node type
(``additionalProperties: false``), so a misspelled key there is an error. It leaves
``provider`` and ``node_config`` open (provider- and cloud-specific keys pass through), so
a typo such as ``provider.regoin`` or ``node_config.InstanceTyp`` is not caught here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _load() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> dict:
    """What ``ray up`` does to a config before it needs the cloud; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_validates():
    prepared = _validate(_load())
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_node_types():
    config = _load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]

    # A CPU head: no GPUs, and no workers of its own type.
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0

    # A GPU worker type that scales from zero.
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type with resources GPU >= 1"
    for name, t in gpu_types.items():
        assert name != config["head_node_type"]
        assert t["min_workers"] == 0, name
        assert t["max_workers"] >= 1, name
        assert t["max_workers"] <= config["max_workers"], name


def _rename(d: dict, old: str, new: str) -> None:
    assert old in d, f"{old!r} not in {sorted(d)}; the test no longer exercises what it says"
    d[new] = d.pop(old)


def _gpu_type(config: dict) -> dict:
    return next(t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1)


# (where, old key, misspelled key); "top" is the top level, "gpu_worker" / "head" a node type.
MISSPELLINGS = [
    ("top", "max_workers", "max_worker"),
    ("top", "idle_timeout_minutes", "idle_timeout_minute"),
    ("top", "available_node_types", "available_node_type"),
    ("top", "head_node_type", "head_node_typ"),
    ("top", "upscaling_speed", "upscale_speed"),
    ("top", "setup_commands", "setup_command"),
    ("top", "worker_start_ray_commands", "worker_start_ray_command"),
    ("auth", "ssh_user", "ssh_username"),
    ("gpu_worker", "max_workers", "max_worker"),
    ("gpu_worker", "min_workers", "min_worker"),
    ("gpu_worker", "resources", "resource"),
    ("gpu_worker", "node_config", "node_configs"),
    ("head", "max_workers", "max_worker"),
]


@pytest.mark.parametrize(("where", "old", "new"), MISSPELLINGS, ids=[f"{w}.{o}->{n}" for w, o, n in MISSPELLINGS])
def test_misspelled_field_fails_validation(where, old, new):
    config = _load()
    if where == "top":
        target = config
    elif where == "auth":
        target = config["auth"]
    elif where == "gpu_worker":
        target = _gpu_type(config)
    else:
        target = config["available_node_types"][config["head_node_type"]]
    _rename(target, old, new)
    with pytest.raises(jsonschema.ValidationError) as err:
        _validate(config)
    # The error names the bad key (an unexpected property) or the missing required one.
    assert new in str(err.value.message) or old in str(err.value.message)


# ----------------------------------------------------------------------------- what the issue asks of it


def _node_types(config: dict) -> dict:
    return config["available_node_types"]


def test_every_worker_type_scales_from_zero_and_head_has_no_cpus():
    config = _load()
    types = _node_types(config)
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "the head must hold no CPUs (tasks land on workers)"
    for name, t in types.items():
        assert t["min_workers"] == 0, f"{name} does not scale from 0"


def test_cpu_workers_beside_gpu_workers():
    types = _node_types(_load())
    cpu = [n for n, t in types.items() if t["resources"].get("CPU", 0) > 0 and t["resources"].get("GPU", 0) == 0]
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu, (cpu, gpu)
    assert all(types[n]["max_workers"] >= 1 for n in cpu)


def test_storage_every_node_sees():
    """S3 through one instance profile on every node, and EFS mounted at one path on every node."""
    config = _load()
    types = _node_types(config)
    profiles = {n: t["node_config"].get("IamInstanceProfile", {}).get("Arn") for n, t in types.items()}
    assert all(profiles.values()) and len(set(profiles.values())) == 1, profiles
    # The mount is in the global setup_commands, which head and workers both run; no node type
    # may replace them (a per-type worker_setup_commands would drop the mount there).
    mounts = [c for c in config["setup_commands"] if "mount -t nfs4" in c]
    assert len(mounts) == 1 and "/mnt/shared" in mounts[0], mounts
    assert "worker_setup_commands" not in config and "head_setup_commands" not in config
    assert not any("worker_setup_commands" in t for t in types.values())


def test_setup_installs_synthaug_from_the_working_tree():
    """The nodes install the synced tree, so their dependencies are pyproject.toml's; no hand list."""
    import tomllib

    config = _load()
    root = CLUSTER_YAML.parent
    (remote, local), = config["file_mounts"].items()
    assert (root / local).resolve() == root and (root / local / "pyproject.toml").is_file()
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert any(c.split()[-1] == remote for c in installs), installs
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    for c in installs:
        typed = {w.split("[")[0].split(">")[0].split("=")[0].strip('"').lower() for w in c.split()}
        assert not (typed & names), f"setup types dependencies by hand: {sorted(typed & names)} in {c!r}"
    assert not any(x in config["rsync_exclude"] for x in ("synthaug", "pyproject.toml"))
