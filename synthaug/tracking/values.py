"""The values synthaug.tracking logs: MLflow-safe keys, flattened configs, a result's numbers."""

from __future__ import annotations

import math
import re

# The config sections whose fields are a stage's params (by the stage name's first word).
STAGE_SECTIONS = {
    "ingest": ("ingest",), "pretrain": ("pretrain",), "finetune": ("finetune",), "sample": ("sample",),
    "filter": ("filter", "pseudolabel"), "teacher": ("classify", "pseudolabel"), "extractor": ("classify", "evaluate"),
    "evaluate": ("evaluate", "classify"), "sweep": ("sweep", "classify", "filter"),
    "pseudolabel": ("pseudolabel", "classify"), "classify": ("classify",), "report": (), "run": None, "study": None,
}
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def clean_key(key: str) -> str:
    """A metric, param or tag key MLflow accepts (letters, digits, ``_-. /``)."""
    return _BAD_KEY.sub("_", str(key))[:250]


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def numbers(result) -> dict[str, float]:
    """The finite numbers of a stage's result (a dict, a tuple holding dicts, a DataFrame's summary),
    one level of nesting deep; the records a manifest carries (``config``, ``inputs``) are left out."""
    if isinstance(result, tuple):
        out: dict = {}
        for part in result:
            out.update(numbers(part))
        return out
    attrs = getattr(result, "attrs", None)
    if isinstance(attrs, dict) and isinstance(attrs.get("summary"), dict):
        result = attrs["summary"]
    if not isinstance(result, dict):
        return {}
    out = {}
    for k, v in result.items():
        if k in ("config", "inputs") or str(k).startswith("_"):
            continue
        items = v.items() if isinstance(v, dict) else [("", v)]
        for sub, x in items:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
                out[clean_key(f"{k}.{sub}" if sub != "" else k)] = float(x)
    return out


def _params(cfg, name: str) -> dict[str, str]:
    """The resolved config of a stage, flattened: its sections (``STAGE_SECTIONS``), or all of it."""
    from synthaug.config import to_dict

    tree = to_dict(cfg)
    sections = STAGE_SECTIONS.get(name.split()[0] if name else "", None)
    if sections is not None:
        tree = {"name": tree["name"], **{s: tree[s] for s in sections}}
    return {clean_key(k): str(v)[:6000] for k, v in flatten(tree).items()}


def _dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name) or "_"
