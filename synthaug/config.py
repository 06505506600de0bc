"""Typed, frozen configs for every stage, loaded from YAML with command-line overrides.

One YAML file holds one section per stage (``ingest``, ``pretrain``, ``finetune``,
``sample``, ``evaluate``, ``classify``, ``sweep``, ``ray``) plus top-level run fields.
Each section is a frozen dataclass; every field carries a one-line ``help`` that the
README's config reference is generated from (``synthaug config-reference``).

Overrides use dotted keys: ``synthaug sample --config x.yaml sample.guidance_scale=1.5``.
Unknown keys, in YAML or on the command line, raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class IngestConfig:
    """Real images -> a contract dataset with train / val (/ pool) splits."""

    source: str = _f("digits", "Where images come from: 'digits', 'imagefolder' or 'parquet'.")
    path: str = _f("", "Image-folder root (root/<class>/<image>) or Parquet file/dir; unused for digits.")
    image_column: str = _f("image", "Parquet source: column with encoded image bytes (or {'bytes': ...} structs).")
    label_column: str = _f("label", "Parquet source: integer label column.")
    class_names: tuple = _f((), "Parquet source: class names in label order; default str(label).")
    image_size: int = _f(0, "Resize images to this square size; 0 keeps the native size (digits: 8).")
    mode: str = _f("", "Image mode to normalise to: 'L' or 'RGB'; '' keeps the source's single mode.")
    val_fraction: float = _f(0.3, "Share of each class held out as the real val split (stable, seeded).")
    k_per_class: int = _f(0, "Low-data regime: keep k labelled train images per class; 0 keeps all.")
    unlabelled_pool: bool = _f(True, "With k > 0, write the rest of the train split as an unlabelled pool.")
    seed: int = _f(0, "Seed of the train/val split and of the k-per-class choice.")
    chunk_size: int = _f(1000, "Images per Ray Data ingest task (one shard per task and split); results do not depend on it.")


@dataclass(frozen=True)
class TrainGenConfig:
    """Diffusion generator training (pretraining on the pool, or class-conditional fine-tuning)."""

    family: str = _f("unet", "Generator family from the registry: 'unet', 'dit' or 'text2image' (the last two fine-tune a `base`).")
    base: str = _f("", "Local diffusers directory to start from; '' builds a new model from `arch` (unet only).")
    arch: str = _f("tiny", "Architecture preset for a new model: 'tiny' or 'small'.")
    steps: int = _f(1500, "Optimiser steps.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, more compute).")
    val_grid_every: int = _f(0, "Save a validation grid (one image per class, fixed seeds, EMA weights) every N steps; 0 = off.")
    batch_size: int = _f(64, "Global batch size (split across workers).")
    lr: float = _f(2e-3, "Peak AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(50, "Linear warm-up steps before cosine decay.")
    grad_accum: int = _f(1, "Gradient-accumulation micro-steps per optimiser step.")
    ema_decay: float = _f(0.995, "EMA decay of the weights used for sampling.")
    label_dropout: float = _f(0.1, "Probability of replacing a label by the null class (for CFG).")
    prediction_type: str = _f("epsilon", "Diffusion target: 'epsilon' or 'v_prediction'.")
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma; 0 disables it.")
    mixed_precision: str = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'no'.")
    hflip: bool = _f(False, "Random horizontal flips (wrong for digits).")
    checkpoint_every: int = _f(500, "Report a checkpoint every N steps (and at the end).")
    num_workers: int = _f(1, "Ray Train workers (DDP).")
    use_gpu: bool = _f(False, "One GPU per worker.")
    max_failures: int = _f(2, "Ray Train FailureConfig.max_failures.")
    seed: int = _f(0, "Training seed.")
    shuffle_buffer: int = _f(1024, "Rows in each worker's local shuffle buffer (decoded uint8 images); epochs also permute the shard order.")
    cache: bool = _f(False, "Cache the decoded training set in the Ray object store (opt-in, for sets that fit in it).")
    prompt_template: str = _f("a photo of a {class_name}", "text2image: the prompt of each class; the null class is the empty prompt.")
    lora_rank: int = _f(0, "text2image: LoRA rank on the UNet's attention projections; 0 fine-tunes the whole UNet.")


@dataclass(frozen=True)
class SampleConfig:
    """Class-balanced sampling with classifier-free guidance through a Ray Data actor pool."""

    per_class: int = _f(100, "Images to sample per class.")
    class_counts: dict = _f({}, "Per-class counts {class_name: n} overriding per_class (only these classes).")
    guidance_scale: float = _f(2.0, "CFG scale w: eps = eps_u + w (eps_c - eps_u); w = 1 is purely conditional.")
    sampler: str = _f("ddim", "'ddpm', 'ddim' or 'dpmsolver++'.")
    steps: int = _f(50, "Denoising steps.")
    ddpm_log_variance_v: float = _f(1.0, "DDPM: variance = exp(v log beta_t + (1-v) log posterior_var).")
    batch_size: int = _f(64, "Images per denoising batch in a sampling actor.")
    chunk_size: int = _f(0, "Images per output shard: one actor call samples (in batches of batch_size) and writes one chunk of one class; 0 = batch_size. Fixed for a set by its first run (plan.json).")
    min_actors: int = _f(1, "Actor pool minimum size.")
    max_actors: int = _f(1, "Actor pool maximum size.")
    num_gpus_per_actor: float = _f(0.0, "GPUs per sampling actor (1 on a GPU cluster).")
    seed: int = _f(0, "Global seed; each image's seed derives from (seed, class, index).")
    compile: bool = _f(False, "torch.compile the denoiser in each sampling actor (slow first batches; part of the output's content key).")


@dataclass(frozen=True)
class EvaluateConfig:
    """Fidelity metrics, CAS and the memorisation audit."""

    extractor: str = _f("in-domain", "Feature extractor for FID/KID/PR/IS: 'in-domain' (offline default) or 'inception-v3-compat' (needs a local weights file).")
    inception_weights: str = _f("", "With extractor 'inception-v3-compat': the local torch-fidelity Inception weights file (verified by its sha256; never downloaded).")
    inception_sha256: str = _f("", "Expected sha256 of inception_weights; '' = the official torch-fidelity checksum.")
    extractor_epochs: int = _f(30, "Epochs for the in-domain extractor classifier (trained on real train).")
    kid_subset_size: int = _f(100, "KID subset size; lowered with a warning when a set is smaller.")
    max_samples: int = _f(50000, "Cap per set for IS, KID and precision/recall: a class-balanced subset chosen by (seed, id, label), as in the paper's FID@50K; its features are the only per-image data held in one process. FID uses every image (merged sums).")
    seed: int = _f(0, "Seed of the capped subset's choice.")
    per_class_fid: bool = _f(True, "Keep per-class feature sums for per-class FID (driver memory: classes x D^2 floats; turn off for many classes with wide features).")
    near_copy_percentile: float = _f(5.0, "Near-copy threshold: this percentile of real-val-to-train distances.")
    near_copy_top_k: int = _f(16, "Closest synthetic/train pairs kept for the report's grid (the only audit images held).")
    near_copy_chunk: int = _f(4096, "Rows per chunk of the near-copy search (synthetic chunks against train chunks, chunked matrix products).")
    batch_size: int = _f(64, "Feature-extraction batch size.")
    min_actors: int = _f(1, "Feature-extraction actor pool minimum size.")
    max_actors: int = _f(1, "Feature-extraction actor pool maximum size.")
    num_gpus_per_actor: float = _f(0.0, "GPUs per feature-extraction actor (1 on a GPU cluster).")

    def __post_init__(self) -> None:
        for key in ("max_samples", "batch_size", "near_copy_chunk", "min_actors"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'evaluate.{key}' must be >= 1")
        if self.max_actors < self.min_actors:
            raise ConfigError("config keys 'evaluate.min_actors' <= 'evaluate.max_actors'")
        if not 0.0 <= self.near_copy_percentile <= 100.0:
            raise ConfigError("config key 'evaluate.near_copy_percentile' must be in [0, 100]")


@dataclass(frozen=True)
class ClassifyConfig:
    """Classifier training on real / synthetic mixtures (Ray Train, timm pieces)."""

    model: str = _f("synthaug_cnn_tiny", "timm model name (synthaug registers tiny CNNs for 8x8 inputs).")
    pretrained_path: str = _f("", "Local weights file (.safetensors or a torch state dict) to start from; the classifier head is re-initialised when the class count differs. Never downloads.")
    epochs: int = _f(30, "Training epochs (see epoch_images).")
    epoch_images: int = _f(0, "Images per epoch; 0 = the real rows of the train set (every mix gets the same optimiser steps as real-only), or the whole set when it has no real rows.")
    batch_size: int = _f(64, "Global batch size.")
    opt: str = _f("adamw", "Optimizer name for timm's create_optimizer_v2.")
    lr: float = _f(3e-3, "Peak learning rate (timm cosine schedule, per optimiser step).")
    min_lr_factor: float = _f(0.01, "Cosine floor as a fraction of lr.")
    warmup_epochs: int = _f(1, "Linear warm-up epochs (timm create_scheduler_v2).")
    weight_decay: float = _f(0.05, "Weight decay (timm: none on biases and norm parameters).")
    label_smoothing: float = _f(0.1, "Label smoothing (inside the Mixup targets when Mixup/CutMix is on).")
    augment: bool = _f(True, "timm create_transform training augmentation (random resized crop, RandAugment, random erasing), run in Ray Data's prefetch threads.")
    crop_scale: tuple = _f((0.8, 1.0), "RandomResizedCrop area range.")
    crop_ratio: tuple = _f((0.9, 1.1), "RandomResizedCrop aspect-ratio range.")
    hflip: float = _f(0.0, "Horizontal-flip probability (0 for digits: a flipped digit is another glyph).")
    auto_augment: str = _f("", "timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment); '' = none.")
    re_prob: float = _f(0.0, "Random-erasing probability (timm RandomErasing, const mode).")
    color_jitter: float = _f(0.0, "ColorJitter strength (brightness/contrast/saturation; timm skips it under RandAugment); 0 = off. It draws from torch's RNG, so runs with it do not repeat bit for bit.")
    mixup_alpha: float = _f(0.0, "Mixup alpha (timm Mixup); 0 = off.")
    cutmix_alpha: float = _f(0.0, "CutMix alpha (timm Mixup); 0 = off.")
    mixup_prob: float = _f(1.0, "Probability of applying Mixup/CutMix to a batch.")
    mixup_switch_prob: float = _f(0.5, "Probability of CutMix instead of Mixup when both are on.")
    model_ema: bool = _f(False, "Keep a timm ModelEmaV3 of the weights; top1/top5 then come from the EMA model.")
    model_ema_decay: float = _f(0.998, "ModelEmaV3 decay.")
    domain_bn: bool = _f(False, "Separate BatchNorm statistics for synthetic images (Diversify, Don't Fine-Tune); real images and evaluation use the real branch.")
    amp: bool = _f(True, "bf16 autocast on GPU (ignored on CPU).")
    channels_last: bool = _f(True, "channels_last memory format on GPU (ignored on CPU).")
    seeds: tuple = _f((0, 1, 2), "Seeds for the repeated classifier runs (mean +- std).")
    checkpoint_every: int = _f(10, "Checkpoint every N epochs (and at the last); metrics are reported every epoch.")
    eval_every: int = _f(1, "Evaluate on the real val split (sharded over the workers) every N epochs and at the last; reports in between repeat the latest numbers (eval_epoch says which). Each evaluation is one Ray Data pass over val.")
    cache: bool = _f(False, "Materialise the decoded train mixture in Ray's object store once, and keep each worker's decoded val share in its memory (only for sets that fit); off: every epoch streams and decodes the Parquet shards again.")
    num_workers: int = _f(1, "Ray Train workers (DDP).")
    use_gpu: bool = _f(False, "One GPU per worker.")
    max_failures: int = _f(1, "Ray Train FailureConfig.max_failures.")


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune grid over guidance scale x mixing ratio (x seed)."""

    guidance_scales: tuple = _f((1.0, 3.0), "Guidance values; sampling runs once per value.")
    ratios: tuple = _f((0.0, 1.0, 3.0), "Synthetic:real ratios r (|syn| = r |real|, class-balanced); 0 = real only.")
    max_concurrent: int = _f(2, "Trials running at once.")
    name: str = _f("sweep", "Experiment name under the run's ray/ dir; re-running with the same name resumes it (another grid needs another name).")


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray."""

    address: str = _f("", "Ray address; '' starts (or joins, under `ray job submit`) a local Ray.")
    num_cpus: int = _f(8, "Logical CPUs for a local Ray (more than the workers need, so Ray Data never starves).")
    include_dashboard: bool = _f(True, "Dashboard on a local Ray (Train V2 cleans placement groups through it).")


@dataclass(frozen=True)
class Config:
    """The whole run: top-level fields plus one section per stage."""

    name: str = _f("default", "Run name; results go to <results_dir>/<name>.")
    results_dir: str = _f("results", "Where reports (metrics, tables, plots) land; committed.")
    work_dir: str = _f("runs", "Where datasets, checkpoints and caches land; git-ignored.")
    allow_downloads: bool = _f(False, "Allow hub downloads (off: every path is local).")
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={"help": "Ingest stage."})
    pretrain: TrainGenConfig = field(default_factory=TrainGenConfig, metadata={"help": "Generator pretraining on the pool."})
    finetune: TrainGenConfig = field(default_factory=lambda: TrainGenConfig(steps=800, lr=1e-3), metadata={"help": "Class-conditional fine-tuning."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Sampling stage."})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"help": "Evaluation stage."})
    classify: ClassifyConfig = field(default_factory=ClassifyConfig, metadata={"help": "Classifier stage."})
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata={"help": "Sweep stage."})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray connection."})

    def __post_init__(self) -> None:
        validate(self)


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), globals())  # resolve postponed annotations
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if tp is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {tp.__name__}") from None
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are an error naming the key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML config (or the defaults) and apply ``key.sub=value`` overrides."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return _build(Config, tree)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-validates."""
    return dataclasses.replace(cfg, **changes)


def dump_config(cfg: Config, run_dir: str | Path, filename: str = "config.yaml") -> str:
    """Write the resolved config into ``run_dir`` (before any work, per the style guide)."""
    from synthaug import storage
    from synthaug.artifacts import atomic_write_text

    # Through the storage layer: ``run_dir`` may be s3://... (Path() would fold its "//").
    return atomic_write_text(storage.join(run_dir, filename), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def reference_markdown(cls: type = Config, prefix: str = "") -> str:
    """The config reference as a markdown table (key, default, help)."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows.append(reference_markdown(type(value), prefix + f.name + ".").strip())
            continue
        rows.append(f"| `{prefix}{f.name}` | `{value!r}` | {f.metadata.get('help', '')} |")
    if prefix:
        return "\n".join(rows) + "\n"
    head = "| key | default | meaning |\n| --- | --- | --- |\n"
    return head + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- validation


_CHOICES = {
    "ingest.source": ("digits", "imagefolder", "parquet"),
    "ingest.mode": ("", "L", "RGB"),
    "sample.sampler": ("ddpm", "ddim", "dpmsolver++"),
    "prediction_type": ("epsilon", "v_prediction"),
    "mixed_precision": ("auto", "bf16", "no"),
}


def prompt_template_problem(template: str, key: str = "prompt_template") -> str | None:
    """Why a text2image prompt template is unusable, or None when it is fine."""
    if "{class_name}" not in template:
        return f"config key '{key}': prompt template {template!r} has no '{{class_name}}', so every class would get the same prompt"
    try:
        template.format(class_name="x")
    except (KeyError, IndexError, ValueError) as e:
        return f"config key '{key}': prompt template {template!r} cannot be filled with only {{class_name}} ({e!r})"
    return None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Value checks that need no data; each message names the key."""
    i, s = cfg.ingest, cfg.sample
    _check(i.source in _CHOICES["ingest.source"], f"config key 'ingest.source': unknown source {i.source!r}; choose from {_CHOICES['ingest.source']}")
    _check(i.mode in _CHOICES["ingest.mode"], f"config key 'ingest.mode': {i.mode!r} not in {_CHOICES['ingest.mode']}")
    _check(0.0 < i.val_fraction < 1.0, "config key 'ingest.val_fraction' must be in (0, 1)")
    _check(i.k_per_class >= 0, "config key 'ingest.k_per_class' must be >= 0")
    _check(i.image_size >= 0, "config key 'ingest.image_size' must be >= 0")
    for name in ("pretrain", "finetune"):
        t: TrainGenConfig = getattr(cfg, name)
        _check(t.steps >= 1, f"config key '{name}.steps' must be >= 1")
        _check(t.batch_size >= t.num_workers, f"config key '{name}.batch_size' must be >= {name}.num_workers")
        _check(t.num_workers >= 1, f"config key '{name}.num_workers' must be >= 1")
        _check(0.0 <= t.label_dropout <= 1.0, f"config key '{name}.label_dropout' must be in [0, 1]")
        _check(t.prediction_type in _CHOICES["prediction_type"], f"config key '{name}.prediction_type': {t.prediction_type!r} not in {_CHOICES['prediction_type']}")
        _check(t.mixed_precision in _CHOICES["mixed_precision"], f"config key '{name}.mixed_precision': {t.mixed_precision!r} not in {_CHOICES['mixed_precision']}")
        _check(t.grad_accum >= 1, f"config key '{name}.grad_accum' must be >= 1")
        _check(t.shuffle_buffer >= 0, f"config key '{name}.shuffle_buffer' must be >= 0")
        _check(t.val_grid_every >= 0, f"config key '{name}.val_grid_every' must be >= 0")
        problem = prompt_template_problem(t.prompt_template, f"{name}.prompt_template")
        _check(problem is None, problem or "")
        _check(t.lora_rank >= 0, f"config key '{name}.lora_rank' must be >= 0")
        _check(t.lora_rank == 0 or t.family == "text2image", f"config key '{name}.lora_rank': LoRA is implemented for family 'text2image' only, not {t.family!r}")
    _check(s.sampler in _CHOICES["sample.sampler"], f"config key 'sample.sampler': unknown sampler {s.sampler!r}; choose from {_CHOICES['sample.sampler']}")
    _check(s.steps >= 1, "config key 'sample.steps' must be >= 1")
    _check(s.guidance_scale >= 0, "config key 'sample.guidance_scale' must be >= 0")
    _check(s.per_class >= 1, "config key 'sample.per_class' must be >= 1 (N = 0 samples nothing)")
    for name, n in s.class_counts.items():
        _check(isinstance(n, int) and n >= 1, f"config key 'sample.class_counts.{name}' must be an integer >= 1 (N = 0 samples nothing)")
    _check(s.batch_size >= 1, "config key 'sample.batch_size' must be >= 1")
    _check(s.chunk_size >= 0, "config key 'sample.chunk_size' must be >= 0 (0 = sample.batch_size)")
    _check(1 <= s.min_actors <= s.max_actors, "config keys 'sample.min_actors' <= 'sample.max_actors', both >= 1")
    c = cfg.classify
    _check(c.epochs >= 1, "config key 'classify.epochs' must be >= 1")
    _check(c.checkpoint_every >= 1, "config key 'classify.checkpoint_every' must be >= 1")
    _check(c.eval_every >= 1, "config key 'classify.eval_every' must be >= 1")
    _check(c.epoch_images >= 0, "config key 'classify.epoch_images' must be >= 0")
    _check(len(c.seeds) >= 1, "config key 'classify.seeds' must list at least one seed")
    _check(c.batch_size >= c.num_workers, "config key 'classify.batch_size' must be >= classify.num_workers")
    _check(len(c.crop_scale) == 2 and 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1, "config key 'classify.crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1")
    _check(len(c.crop_ratio) == 2 and 0 < c.crop_ratio[0] <= c.crop_ratio[1], "config key 'classify.crop_ratio' must be [lo, hi] with 0 < lo <= hi")
    _check(c.color_jitter >= 0, "config key 'classify.color_jitter' must be >= 0")
    for key in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
        _check(0.0 <= getattr(c, key) <= 1.0, f"config key 'classify.{key}' must be in [0, 1]")
    _check(c.mixup_alpha >= 0 and c.cutmix_alpha >= 0, "config keys 'classify.mixup_alpha' and 'classify.cutmix_alpha' must be >= 0")
    _check(0.0 < c.model_ema_decay < 1.0, "config key 'classify.model_ema_decay' must be in (0, 1)")
    _check(c.warmup_epochs >= 0, "config key 'classify.warmup_epochs' must be >= 0")
    w = cfg.sweep
    _check(len(w.guidance_scales) >= 1 and len(w.ratios) >= 1, "config keys 'sweep.guidance_scales' and 'sweep.ratios' must not be empty (empty grid)")
    for r in w.ratios:
        _check(float(r) >= 0, f"config key 'sweep.ratios': ratio {r} < 0")
    for g in w.guidance_scales:
        _check(float(g) >= 0, f"config key 'sweep.guidance_scales': guidance {g} < 0")
