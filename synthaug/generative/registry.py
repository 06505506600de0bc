"""The generator-family registry: family name -> :class:`Family`, checked for duplicates.

A *family* is one kind of generator (a diffusers denoiser class plus the frozen parts
it needs): how to build a new one, load one from a local diffusers directory, call
it, and move between pixels and the space its diffusion runs in. The built-in
families are named here, with the module that defines each (``unet`` in
:mod:`synthaug.generative.models`, ``dit`` and ``text2image`` in
:mod:`synthaug.generative.latent`), and imported on first look-up; this module
imports neither, so the family modules depend on the registry and never on each
other. Further families are added with :func:`register`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from synthaug.errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

# name -> "module:attribute" of the Family object (imported on first use).
BUILTIN: dict[str, str] = {
    "unet": "synthaug.generative.models:UNET",
    "dit": "synthaug.generative.latent:DIT",
    "text2image": "synthaug.generative.latent:TEXT2IMAGE",
}


class GeneratorError(InputError, ValueError):
    """A generator directory or family is wrong; the message names it."""


@dataclass(frozen=True)
class LoadSpec:
    """What a caller asks of a loaded generator; zeros and '' mean "the model's own"."""

    class_names: tuple[str, ...]
    image_size: int = 0
    channels: int = 0
    prompt_template: str = ""
    lora_rank: int = 0
    trained_classes: int = 0  # an export's own class count (its manifest's); 0 for a plain diffusers base


class Loaded(NamedTuple):
    """What a family's loader returns."""

    model: "nn.Module"
    components: dict
    image_size: int
    channels: int
    meta: dict


class Shape(NamedTuple):
    """The pixel images a base takes, as its configs say (a probe; no weights read)."""

    image_size: int
    channels: int


def _identity(gen: Any, x: "torch.Tensor", deterministic: bool = False) -> "torch.Tensor":
    return x


def _pixel_shape(gen: Any) -> tuple[int, int, int]:
    return (gen.channels, gen.image_size, gen.image_size)


def _same(model: "nn.Module") -> "nn.Module":
    return model


def _no_pipeline_config(class_names: list[str]) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    """How to build, probe, load, call, encode for and save one kind of generator."""

    name: str
    build: Callable[..., "nn.Module"] | None  # a new model from an `arch` preset; None: fine-tune from a base only
    load_model: Callable[["Path", LoadSpec], Loaded]  # from a local generator root directory
    denoise: Callable[["nn.Module", "torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]
    model_subdir: str
    model_class: str  # the diffusers class <model_subdir>/config.json must name
    components: tuple[str, ...] = ()  # other subfolders a base needs, besides scheduler/
    # (gen, pixels) -> diffusion space; called with deterministic=True for image-to-image sources (no random draw).
    encode: Callable[..., "torch.Tensor"] = _identity
    decode: Callable[[Any, "torch.Tensor"], "torch.Tensor"] = _identity
    latent_shape: Callable[[Any], tuple[int, int, int]] = _pixel_shape
    export_model: Callable[["nn.Module"], "nn.Module"] = _same  # the diffusers model to save_pretrained
    latent: bool = False  # diffusion in a VAE's latent space (no [-1, 1] clipping of x0)
    # From the configs of a base at a location (any storage): the pixel shape it runs at, or GeneratorError.
    probe: Callable[[Callable[[str], dict | None], str, LoadSpec], Shape] | None = None
    # The diffusers pipeline class an export's model_index.json names, so `<pipeline>.from_pretrained(export)`
    # loads it ('' = none: no diffusers pipeline takes this family's class labels), and its other init
    # arguments, from the class names (components left out, e.g. safety_checker=None; labels for the user).
    pipeline: str = ""
    pipeline_config: Callable[[list[str]], dict] = _no_pipeline_config


_REGISTERED: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """Add a family; a name that is taken (built in or registered) is an error."""
    if fam.name in _REGISTERED or fam.name in BUILTIN:
        raise KeyError(f"generator family {fam.name!r} registered twice")
    _REGISTERED[fam.name] = fam
    return fam


def _load_builtin(name: str) -> Family:
    module, attr = BUILTIN[name].split(":")
    fam = getattr(importlib.import_module(module), attr)
    if fam.name != name:
        raise KeyError(f"{BUILTIN[name]} is family {fam.name!r}, registered as {name!r}")
    return fam


def names() -> list[str]:
    return sorted({*BUILTIN, *_REGISTERED})


def get(name: str) -> Family:
    """The family called ``name``; an unknown name is a GeneratorError listing the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN:
        return _load_builtin(name)
    raise GeneratorError(f"unknown generator family {name!r}; registered: {names()}")


def families() -> list[Family]:
    return [get(n) for n in names()]


def parse_config(text: str, where: str) -> dict:
    """A diffusers ``config.json``'s contents, or a GeneratorError naming the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GeneratorError(f"{where}: unreadable config ({e})") from None
