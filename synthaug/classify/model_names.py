"""Checking ``classify.model`` without importing timm in the driver.

Importing timm (and the torchvision it imports) costs ~3.3 s here, on top of torch's
~2.7 s, in every stage command that only needs to know whether a name exists. The names
timm knows, synthaug's own registrations included, are kept in a small file under the
cache root (:func:`synthaug.storage.cache_root`), named by timm's version and the hash of
``synthaug/classify/cnn.py``. A name found there is known; a miss (or no file) asks
timm itself and rewrites the file, so a model registered by the user's own code is
never refused by a stale list.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

from synthaug.errors import InputNotFound, InputValueError


def _names_file() -> Path:
    from synthaug.storage import cache_root

    src = hashlib.sha256(Path(__file__).with_name("cnn.py").read_bytes()).hexdigest()[:12]
    return cache_root() / f"timm-{version('timm')}-models-{src}.json"


def _timm_names() -> list[str]:
    import timm

    import synthaug.classify.cnn  # noqa: F401  (registers synthaug's CNNs with timm)

    names = timm.list_models()
    f = _names_file()
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, f)
    except OSError:  # a read-only cache only costs the next command the import again
        pass
    return names


def check_model_name(name: str) -> None:
    """Raise a clear error, with close names, for a model timm does not know."""
    f = _names_file()
    try:
        if name in set(json.loads(f.read_text())):
            return
    except (OSError, ValueError):
        pass
    names = _timm_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise InputValueError(f"config key 'classify.model': unknown timm model {name!r}{hint}")


def check_classifier_config(cfg, num_classes: int, in_chans: int) -> None:
    """Errors a worker would hit, raised in the driver first: model name, weights file, domain BN."""
    check_model_name(cfg.model)
    if cfg.pretrained_path and not Path(cfg.pretrained_path).is_file():
        raise InputNotFound(f"config key 'classify.pretrained_path': {cfg.pretrained_path} is not a file")
    if cfg.domain_bn:
        import timm
        import torch

        from synthaug.classify.domain import convert_domain_bn

        with torch.device("meta"):  # shapes only, no memory
            convert_domain_bn(timm.create_model(cfg.model, num_classes=num_classes, in_chans=in_chans))
