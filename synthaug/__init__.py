"""synthaug: a labelled image dataset -> a better classifier, with synthetic images from a fine-tuned diffusion model.

The Python API is :mod:`synthaug.api`; its main calls are here too (``synthaug.run(...)``),
imported on first use so that ``import synthaug`` loads neither torch nor Ray. The stages
whose names are also subpackages or modules here (``evaluate``, ``classify``, ``sweep``,
``study``) are called as ``synthaug.api.evaluate(...)`` and so on.
"""

from __future__ import annotations

# Names of synthaug.api served at top level (none may name a submodule: importing that
# submodule would replace the function with the module).
_API = ("run", "ingest", "pretrain", "finetune", "sample", "pseudolabel", "load", "check")

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from synthaug import api

        return getattr(api, name)
    raise AttributeError(f"module 'synthaug' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
