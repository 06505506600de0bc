"""deploy/k8s/rayjob.yaml against KubeRay's own RayJob CRD schema, offline: no cluster, no kubectl.

The schema is ``spec.versions[].schema.openAPIV3Schema`` of ``ray.io_rayjobs.yaml`` from the
ray-project/kuberay repository (Apache-2.0), kept with its licence in ``<repo>/../shared/kuberay/``;
the tests skip, saying so, when that directory is absent.

A CRD schema is a *structural* OpenAPI v3 schema, and the API server treats it more strictly
than plain JSON Schema reads it. :func:`strict_schema` makes those semantics explicit so that
``jsonschema`` enforces them:

- unknown fields: the server prunes (or, with ``kubectl apply`` / server-side field validation
  ``Strict``, rejects) every field the schema does not name, except under
  ``x-kubernetes-preserve-unknown-fields: true``. JSON Schema allows them by default, so each
  object with ``properties`` and no ``additionalProperties`` gets ``additionalProperties: false``.
  A misspelled field therefore fails, as it would with ``kubectl apply --validate=strict``.
- ``nullable: true`` (OpenAPI) becomes an explicit ``null`` in the allowed types.
- ``x-kubernetes-int-or-string`` is checked as integer-or-string (the CRD also spells it as ``anyOf``).
- ``x-kubernetes-list-type: map`` with ``x-kubernetes-list-map-keys``: items must be unique by
  those keys (two containers with one name fail); ``list-type: set``: unique items.

Not checked (needs the API server): ``x-kubernetes-validations`` CEL rules, defaults.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAYJOB = ROOT / "deploy" / "k8s" / "rayjob.yaml"
# KubeRay's own files (Apache-2.0, see their LICENSE): ../shared/kuberay beside the checkout, else
# the copy vendored in tests/data/kuberay, so a clone anywhere validates against the real CRD.
KUBERAY = next((d for d in (ROOT.parent / "shared" / "kuberay", ROOT / "tests" / "data" / "kuberay")
                if (d / "ray.io_rayjobs.yaml").is_file()), ROOT / "tests" / "data" / "kuberay")
CRD = KUBERAY / "ray.io_rayjobs.yaml"
SAMPLE = KUBERAY / "sample-ray-job.pytorch-image-classifier.yaml"

pytestmark = pytest.mark.skipif(
    not CRD.is_file(),
    reason=f"KubeRay's RayJob CRD is not at {CRD} (copy ray.io_rayjobs.yaml from ray-project/kuberay, "
           "ray-operator/config/crd/bases/, to validate deploy/k8s/rayjob.yaml)",
)


# ----------------------------------------------------------------------------- the schema, made strict


def strict_schema(node):
    """A copy of a structural CRD schema with the API server's semantics spelled out for jsonschema."""
    if isinstance(node, list):
        return [strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) if k not in ("enum", "default", "example") else v for k, v in node.items()}
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _unique_by_keys(validator, keys, instance, schema):
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(str(item.get(k)) for k in keys) if isinstance(item, dict) else (repr(item),)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {dict(zip(keys, key))}")
        seen.add(key)


def _list_type(validator, kind, instance, schema):
    if kind == "set" and isinstance(instance, list):
        reprs = [repr(x) for x in instance]
        if len(set(reprs)) != len(reprs):
            yield jsonschema.ValidationError(f"duplicate items in a list-type 'set': {instance}")


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-map-keys": _unique_by_keys, "x-kubernetes-list-type": _list_type},
)


@functools.lru_cache(maxsize=1)
def _crd() -> dict:
    """The CRD, parsed once per session (1.4 MB of YAML)."""
    with open(CRD) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=None)
def _validator(version: str):
    versions = {v["name"]: v for v in _crd()["spec"]["versions"]}
    return CRDValidator(strict_schema(versions[version]["schema"]["openAPIV3Schema"]))


def validate_rayjob(doc: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` is a valid RayJob for a served CRD version."""
    crd = _crd()
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    api = doc.get("apiVersion", "")
    if doc.get("kind") != kind:
        raise jsonschema.ValidationError(f"kind {doc.get('kind')!r} is not {kind!r}")
    g, _, v = api.partition("/")
    if g != group or v not in versions:
        raise jsonschema.ValidationError(f"apiVersion {api!r} is not one of {[f'{group}/{x}' for x in versions]}")
    err = jsonschema.exceptions.best_match(_validator(v).iter_errors(doc))
    if err is not None:
        raise err


def _load() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


# ----------------------------------------------------------------------------- the manifest


def test_rayjob_validates_against_kuberay_crd():
    validate_rayjob(_load())


def test_kuberay_own_sample_validates():
    """The strict reading does not reject what KubeRay itself ships (the check is not over-tight)."""
    validate_rayjob(yaml.safe_load(SAMPLE.read_text()))


def _pods(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_head_has_no_cpus_and_gpu_group_autoscales_from_zero():
    spec = _load()["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    gpu = [g for g in spec["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no worker group asks for nvidia.com/gpu"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1, g["groupName"]


def test_shared_storage_on_every_pod_and_entrypoint():
    doc = _load()
    for pod in _pods(doc):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts.get("/mnt/shared") in claims, "every pod mounts the shared PVC at /mnt/shared"
        assert pod["serviceAccountName"] == "synthaug", "every pod gets the IRSA service account (S3 access)"
    entry = doc["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/pipeline.py"]
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config).is_file(), config
    assert any(a.startswith("work_dir=s3://") for a in entry), "work_dir on object storage"
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"


# ----------------------------------------------------------------------------- the check can fail


def _at(doc: dict, path: str):
    """The node at a dotted path; integers index lists."""
    node = doc
    for p in path.split(".") if path else []:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


MISSPELLED = [
    ("spec", "entrypoint", "entrypont"),
    ("spec", "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ("spec.rayClusterSpec", "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    ("spec.rayClusterSpec", "workerGroupSpecs", "workerGroupSpec"),
    ("spec.rayClusterSpec", "headGroupSpec", "headGroupSpecs"),
    ("spec.rayClusterSpec.headGroupSpec", "rayStartParams", "rayStartParam"),
    ("spec.rayClusterSpec.autoscalerOptions", "idleTimeoutSeconds", "idleTimeoutSecond"),
    ("spec.rayClusterSpec.workerGroupSpecs.0", "minReplicas", "minReplica"),
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0", "resources", "resource"),
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.volumeMounts.0", "mountPath", "mountpath"),
    ("spec.rayClusterSpec.headGroupSpec.template.spec.volumes.0", "persistentVolumeClaim", "persistentVolumeClaims"),
]


@pytest.mark.parametrize(("where", "old", "new"), MISSPELLED, ids=[f"{w}.{o}->{n}" for w, o, n in MISSPELLED])
def test_misspelled_field_fails(where, old, new):
    doc = _load()
    node = _at(doc, where)
    assert old in node, f"{old!r} not at {where}; the test no longer exercises what it says"
    node[new] = node.pop(old)
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_rayjob(doc)
    assert new in err.value.message or old in err.value.message, err.value.message


WRONG_TYPES = [
    ("spec.rayClusterSpec.workerGroupSpecs.0", "minReplicas", "0"),  # integer field given a string
    ("spec.rayClusterSpec.workerGroupSpecs.0", "maxReplicas", 8.5),
    ("spec.rayClusterSpec", "enableInTreeAutoscaling", "yes"),
    ("spec.rayClusterSpec.headGroupSpec.rayStartParams", "num-cpus", 0),  # map of strings given an int
    ("spec", "entrypoint", ["python", "jobs/pipeline.py"]),
    ("spec", "ttlSecondsAfterFinished", "600"),
    ("spec.rayClusterSpec.autoscalerOptions", "upscalingMode", "Fast"),  # not in the enum
    ("spec.rayClusterSpec.headGroupSpec.template.spec", "containers", {"name": "ray-head"}),
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits", "cpu", "eight"),  # not a quantity
]


@pytest.mark.parametrize(("where", "key", "value"), WRONG_TYPES, ids=[f"{w}.{k}={v!r}" for w, k, v in WRONG_TYPES])
def test_wrongly_typed_field_fails(where, key, value):
    doc = _load()
    node = _at(doc, where)
    assert key in node, f"{key!r} not at {where}"
    node[key] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_rayjob(doc)


# Lists the CRD marks x-kubernetes-list-type: map, keyed by name (containers, volumes) or mountPath.
DUPLICATES = [
    "spec.rayClusterSpec.headGroupSpec.template.spec.containers",
    "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.volumes",
    "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.volumeMounts",
]


@pytest.mark.parametrize("where", DUPLICATES)
def test_duplicate_list_map_key_fails(where):
    doc = _load()
    items = _at(doc, where)
    items.append(copy.deepcopy(items[0]))
    with pytest.raises(jsonschema.ValidationError, match="duplicate"):
        validate_rayjob(doc)


def test_wrong_api_version_or_kind_fails():
    for key, value in (("apiVersion", "ray.io/v2"), ("kind", "RayCluster")):
        doc = _load()
        doc[key] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_rayjob(doc)
