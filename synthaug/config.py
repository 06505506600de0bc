"""Typed, frozen configs for every stage, loaded from YAML with command-line overrides.

One YAML file holds one section per stage (``ingest``, ``pretrain``, ``finetune``,
``sample``, ``evaluate``, ``classify``, ``pseudolabel``, ``filter``, ``sweep``, ``ray``, ``tracking``) plus top-level run fields.
Each section is a frozen dataclass; every field carries a one-line ``help`` that the
README's config reference is generated from (``synthaug config-reference``).

Overrides use dotted keys: ``synthaug sample --config x.yaml sample.guidance_scale=1.5``.
Unknown keys, in YAML or on the command line, raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

from synthaug.errors import InputError


class ConfigError(InputError, ValueError):
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

    source: Literal["digits", "imagefolder", "parquet"] = _f("digits", "Where images come from: 'digits', 'imagefolder' or 'parquet'.")
    path: str = _f("", "Image-folder root (root/<class>/<image>) or Parquet file/dir; unused for digits.")
    image_column: str = _f("image", "Parquet source: column with encoded image bytes (or {'bytes': ...} structs).")
    label_column: str = _f("label", "Parquet source: integer label column.")
    class_names: tuple = _f((), "Parquet source: class names in label order; default str(label).")
    image_size: int = _f(0, "Resize images to this square size; 0 keeps the native size (digits: 8).")
    mode: Literal["", "L", "RGB"] = _f("", "Image mode to normalise to: 'L' or 'RGB'; '' keeps the source's single mode.")
    val_fraction: float = _f(0.3, "Share of each class held out as the real val split (stable, seeded): what recipes are chosen on.")
    test_fraction: float = _f(0.0, "Share of each class held out as the test split (stable, seeded): reported, never trained or chosen on; 0 = none (or test_path).")
    test_path: str = _f("", "A second source of the same kind (an official test set: Parquet file/dir or image folder) whose rows all form the test split; excludes test_fraction.")
    k_per_class: int = _f(0, "Low-data regime: keep k labelled train images per class; 0 keeps all.")
    unlabelled_pool: bool = _f(True, "With k > 0, write the rest of the train split as an unlabelled pool.")
    seed: int = _f(0, "Seed of the train/val split and of the k-per-class choice.")
    chunk_size: int = _f(1000, "Images per Ray Data ingest task (one shard per task and split); results do not depend on it.")

    def __post_init__(self) -> None:
        _check_ingest(self, _prefix(self))


@dataclass(frozen=True)
class TrainGenConfig:
    """Diffusion generator training (pretraining on the pool, or class-conditional fine-tuning)."""

    family: str = _f("unet", "Generator family from the registry: 'unet', 'dit' or 'text2image' (the last two fine-tune a `base`).")
    data: str = _f("", "`synthaug run`: train on this contract dataset (any location) instead of the run's own (pretrain: the unlabelled pool; finetune: the labelled train split). Pretraining ignores labels, so any unlabelled corpus of the same image size and channels works.")
    extra_data: tuple = _f((), "More contract datasets trained on together with the main one, e.g. the pseudo-labelled pool rows (DPT: a generator fine-tuned on labelled + pseudo-labelled data); same classes, size and channels.")
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
    prediction_type: Literal["epsilon", "v_prediction"] = _f("epsilon", "Diffusion target: 'epsilon' or 'v_prediction'.")
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma; 0 disables it.")
    mixed_precision: Literal["auto", "bf16", "no"] = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'no'.")
    hflip: bool = _f(False, "Random horizontal flips (wrong for digits).")
    checkpoint_every: int = _f(500, "Report a checkpoint every N steps (and at the end).")
    num_workers: int = _f(1, "Training workers: 1 runs the loop in one Ray task; more are Ray Train workers (DDP).")
    use_gpu: bool = _f(False, "One GPU per worker.")
    max_failures: int = _f(2, "Restarts after a worker dies: Ray Train FailureConfig.max_failures; with one worker, the Ray task's max_retries (it resumes from its latest checkpoint).")
    seed: int = _f(0, "Training seed.")
    shuffle_buffer: int = _f(1024, "Rows in each worker's local shuffle buffer at least (decoded uint8 images); it also holds 16 of the dataset's largest shards, within shuffle_buffer_mb, and epochs permute the shard order.")
    shuffle_buffer_mb: int = _f(1024, "Upper bound (MiB of decoded rows) of each worker's local shuffle buffer.")
    cache: bool = _f(False, "Cache the decoded training set in the Ray object store (opt-in, for sets that fit in it).")
    latent_cache: bool = _f(False, "Latent families: encode the dataset through the VAE once into a keyed contract dataset (<work>/latents/), so epochs do not re-encode.")
    prompt_template: str = _f("a photo of a {class_name}", "text2image: the prompt of each class; the null class is the empty prompt.")
    lora_rank: int = _f(0, "text2image: LoRA rank on the UNet's attention projections; 0 fine-tunes the whole UNet.")

    def __post_init__(self) -> None:
        _check_train(self, _prefix(self))


@dataclass(frozen=True)
class SampleConfig:
    """Class-balanced sampling with classifier-free guidance through a Ray Data actor pool."""

    per_class: int = _f(100, "Images to sample per class.")
    class_counts: dict = _f({}, "Per-class counts {class_name: n} overriding per_class (only these classes).")
    guidance_scale: float = _f(2.0, "CFG scale w: eps = eps_u + w (eps_c - eps_u); w = 1 is purely conditional.")
    sampler: Literal["ddpm", "ddim", "dpmsolver++"] = _f("ddim", "'ddpm', 'ddim' or 'dpmsolver++'.")
    steps: int = _f(50, "Denoising steps.")
    ddpm_log_variance_v: float = _f(1.0, "DDPM: variance = exp(v log beta_t + (1-v) log posterior_var).")
    batch_size: int = _f(64, "Images per denoising batch in a sampling actor.")
    chunk_size: int = _f(0, "Images per output shard: one actor call samples (in batches of batch_size) and writes one chunk of one class; 0 = batch_size. Fixed for a set by its first run (plan.json).")
    min_actors: int = _f(1, "Actor pool minimum size.")
    max_actors: int = _f(1, "Actor pool maximum size (a set of at most 4,096 rows with no GPU runs in up to this many pooled Ray tasks instead, which keep the model loaded between passes).")
    num_gpus_per_actor: float = _f(0.0, "GPUs per sampling actor (1 on a GPU cluster).")
    seed: int = _f(0, "Global seed; each image's seed derives from (seed, class, index).")
    compile: bool = _f(False, "torch.compile the denoiser in each sampling actor (slow first batches; part of the output's content key).")
    init: Literal["noise", "real"] = _f("noise", "Where sampling starts: 'noise' (text-to-image) or 'real' (image-to-image, SDEdit): a real train image of the class noised to `strength`.")
    strength: float = _f(0.5, "init 'real': noise strength s in (0, 1]: the source is noised to the level of the schedule's step steps - int(steps * s) and only the last int(steps * s) steps run (small s: close to the source; 1: nearly text-to-image).")
    source: str = _f("", "init 'real': the real contract dataset the sources come from; '' = the run's train split (<work_dir>/<name>/data/train). Sample i of class c starts from the class's image at position i mod n_c in an order seeded by `seed`.")

    def __post_init__(self) -> None:
        _check_sample(self, _prefix(self))


@dataclass(frozen=True)
class EvaluateConfig:
    """Fidelity metrics, CAS and the memorisation audit."""

    extractor: Literal["in-domain", "inception-v3-compat"] = _f("in-domain", "Feature extractor for FID/KID/PR/IS: 'in-domain' (offline default) or 'inception-v3-compat' (needs a local weights file).")
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
    max_actors: int = _f(1, "Feature-extraction actor pool maximum size (a set of at most 4,096 rows with no GPU runs in up to this many pooled Ray tasks instead, which keep the model loaded between passes).")
    num_gpus_per_actor: float = _f(0.0, "GPUs per feature-extraction actor (1 on a GPU cluster).")

    def __post_init__(self) -> None:
        _check_evaluate(self, _prefix(self))


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
    added_batch: int = _f(0, "Two-stream batches (He et al. 2023): each step a full real batch of batch_size plus this many added rows (the mixture's synthetic and pseudo-labelled parts, their own stream); 0 = one stream, the parts shuffled together.")
    added_weight: float = _f(1.0, "Two-stream: the added batch's loss weight (loss = real loss + added_weight x added loss).")
    kd_teacher: str = _f("", "Soft targets on the added rows (knowledge distillation, He et al.; DM-KD): saved classifier(s) whose averaged tempered probabilities are the targets, comma-separated locations (e.g. the real-only seeds' models); needs added_batch.")
    kd_weight: float = _f(0.5, "Soft targets: the weight of the distillation term against the hard labels on the added rows (0 = hard labels only, 1 = soft only).")
    kd_temperature: float = _f(2.0, "Soft targets: the temperature of teacher and student probabilities (the term is scaled by T^2).")
    cache: bool = _f(False, "Materialise the decoded train mixture in Ray's object store once, and keep each worker's decoded val share in its memory (only for sets that fit); epochs then keep the first epoch's file order (the local shuffle still reshuffles). Off: every epoch streams and decodes the Parquet shards again, in a new file order.")
    shuffle_buffer_mb: int = _f(1024, "Upper bound (MiB of decoded uint8 rows) of each worker's local shuffle buffer; the buffer holds 16 of the mixture's largest shards (at least 8 batches), so class-sorted shards still give class-mixed batches.")
    num_workers: int = _f(1, "Training workers: 1 runs the loop in one Ray task; more are Ray Train workers (DDP).")
    cpus_per_worker: int = _f(1, "CPUs each training process asks Ray for (a sweep trial's too), and its torch threads. 1: figures repeat bit for bit on any machine of one processor type, whatever its core count. More trains faster where cores are spare (e.g. 2 for one worker on a 2-core machine), with figures that differ in their last digits (a run of another key).")
    use_gpu: bool = _f(False, "One GPU per worker.")
    max_failures: int = _f(1, "Restarts after a worker dies: Ray Train FailureConfig.max_failures; with one worker, the Ray task's max_retries (it resumes from its latest checkpoint).")

    def __post_init__(self) -> None:
        _check_classify(self, _prefix(self))


@dataclass(frozen=True)
class PseudoLabelConfig:
    """The pseudo-label baseline: a teacher trained on the labelled set labels the unlabelled pool."""

    enabled: bool = _f(True, "`synthaug run`: run the pseudo-label baseline when the run has an unlabelled pool (its row in the summary).")
    select: Literal["threshold", "top_fraction"] = _f("threshold", "Which pool rows to keep: 'threshold' (top probability >= threshold) or 'top_fraction' (per predicted class, that share of its rows, most confident first).")
    threshold: float = _f(0.8, "select 'threshold': keep a pool row when the teacher's top class probability is >= this.")
    top_fraction: float = _f(0.5, "select 'top_fraction': per predicted class, keep this share of its rows (most confident first, ties by id hash).")
    teacher_seed: int = _f(0, "Seed of the teacher: the real-only classifier (classify.*, labelled set) that labels the pool and filters synthetic images; the same run as `synthaug classify --ratio 0` with that seed.")
    with_synthetic: bool = _f(False, "Also train on labelled + pseudo-labelled + synthetic (sample.guidance_scale, the headline ratio) and report it.")
    batch_size: int = _f(256, "Images per teacher inference batch (Ray Data actor pool); results do not depend on it.")
    min_actors: int = _f(1, "Teacher inference actor pool minimum size.")
    max_actors: int = _f(1, "Teacher inference actor pool maximum size.")
    num_gpus_per_actor: float = _f(0.0, "GPUs per teacher inference actor (1 on a GPU cluster).")

    def __post_init__(self) -> None:
        _check_pseudolabel(self, _prefix(self))


@dataclass(frozen=True)
class FilterConfig:
    """Confidence filtering of synthetic sets by the teacher (pseudolabel.teacher_seed) before mixing."""

    tau: float = _f(0.0, "Keep a synthetic image only if the teacher gives its intended class a probability >= tau; 0 = off (every image kept). The filtered set is a keyed dataset that the sweep and the mixtures use; the share kept per class is in the summary.")

    def __post_init__(self) -> None:
        _check(0.0 <= self.tau <= 1.0, f"config key '{_prefix(self)}tau' must be in [0, 1] (0 = off)")


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune grid over guidance scale (x image-to-image strength x filter tau) x mixing ratio (x seed)."""

    guidance_scales: tuple = _f((1.0, 3.0), "Guidance values; sampling runs once per value.")
    ratios: tuple = _f((0.0, 1.0, 3.0), "Synthetic:real ratios r (|syn| = r |real|, class-balanced); 0 = real only.")
    strengths: tuple = _f((), "Image-to-image strengths to sweep: each (guidance, strength) is sampled once with `sample.init: real` at that `sample.strength`; `null` in the list is text-to-image (`sample.init: noise`). () = the sample config's init and strength only.")
    taus: tuple = _f((), "Confidence-filter thresholds to sweep: each sampled set is filtered once per tau (`filter.tau`; 0 = unfiltered). () = `filter.tau` only.")
    max_concurrent: int = _f(2, "Trials running at once.")
    name: str = _f("sweep", "Experiment name under the run's ray/ dir; re-running with the same name resumes it (another grid needs another name).")

    def __post_init__(self) -> None:
        _check_sweep(self, _prefix(self))


_RUN_SECTIONS = frozenset({"ingest", "pretrain", "finetune", "sample", "evaluate", "classify", "pseudolabel", "filter", "sweep"})
# The study keys that only one (k, draw) run reads (its arms), so study.k_overrides may set them per k.
_RUN_STUDY_KEYS = frozenset({"dpt", "dpt_tau"})


def _run_key_path(dotted: str) -> bool:
    """Whether ``dotted`` names a key that one (k, draw) run of a study reads (study.k_overrides)."""
    section, _, rest = dotted.partition(".")
    return section in _RUN_SECTIONS or (section == "study" and rest.split(".")[0] in _RUN_STUDY_KEYS)


@dataclass(frozen=True)
class StudyConfig:
    """`synthaug study`: the run's recipe arms over k labelled images per class x subset draws x classifier seeds."""

    k_per_class: tuple = _f((5, 10, 30), "Labelled images per class: one run per (k, draw), named <name>-k<k>-d<draw>.")
    draws: tuple = _f((0, 1), "Subset draws: `ingest.seed` of each run (which k images per class are labelled, and the train/val split).")
    headline_k: int = _f(10, "The k whose figures head the study's summary (must be in k_per_class).")
    share_pretrain: bool = _f(True, "Pretrain once per draw on the draw's whole train split (its labels unused), shared by every k; false: each (k, draw) run pretrains on its own unlabelled pool, as `synthaug run` does.")
    pretrain_once: bool = _f(False, "With share_pretrain: one pretraining for the whole study, on the first draw's whole train split (labels unused), used by every draw and k. Cheaper; the other draws' val images are then in the generator's unlabelled corpus (never their labels), so prefer it when nothing is chosen on val (one budget).")
    dpt: bool = _f(False, "Also arms whose generator is fine-tuned on the labelled rows plus the pseudo-labelled pool (DPT, arXiv 2302.10586; needs the unlabelled pool): sampled and filtered like the mixed sets, mixed with the real rows, with each recipe.")
    dpt_tau: float | None = _f(None, "The teacher confidence DPT's sampled set is filtered at before mixing (0 = unfiltered); null = each of the sweep's taus, like the labelled-only generator's sets. Its own value lets the arm mix where the pseudo-labels' noise leaves too few confident images of a class.")
    budgets: tuple = _f((), "Training budgets (classify.epoch_images, independent of the mix): every arm runs at each; an arm is reported at its best budget on val, beside the equal-budget tables. () = classify.epoch_images only.")
    k_overrides: dict = _f({}, "Config overrides for the runs of one k: {k: {dotted key: value}} in a run's sections (not `ray` or `tracking`; of `study`, only `dpt` and `dpt_tau`), e.g. {50: {filter.tau: 0.0, sweep.taus: [0.0]}} where a filter that suits k = 10 keeps too few images to mix 1:1 with 50 real images per class. Each run's key covers the sections they change.")
    recipes: dict = _f({}, "Training recipes for the arms with added data: {name: {classify key: value}}, e.g. {two-stream: {added_batch: 64, added_weight: 0.5}}; kd_teacher: teacher = the run's real-only teacher. Each is an arm of its own beside the plain recipe.")

    def __post_init__(self) -> None:
        p = _prefix(self)
        for name in ("k_per_class", "draws"):
            v = getattr(self, name)
            _check(len(v) >= 1 and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                   f"config key '{p}{name}' must be a non-empty list of integers")
            _check(len(set(v)) == len(v), f"config key '{p}{name}' lists a value twice")
        _check(all(k >= 1 for k in self.k_per_class), f"config key '{p}k_per_class': every k must be >= 1")
        _check(self.headline_k in self.k_per_class, f"config key '{p}headline_k' = {self.headline_k} is not in '{p}k_per_class'")
        _check(all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.budgets),
               f"config key '{p}budgets' must list positive integers (classify.epoch_images values)")
        _check(self.dpt_tau is None or (isinstance(self.dpt_tau, (int, float)) and not isinstance(self.dpt_tau, bool)
                                        and 0.0 <= self.dpt_tau < 1.0),
               f"config key '{p}dpt_tau' must be null or a number in [0, 1)")
        _check(isinstance(self.k_overrides, dict) and all(isinstance(v, dict) for v in self.k_overrides.values())
               and all(str(k).isdigit() for k in self.k_overrides),
               f"config key '{p}k_overrides' must map a k to {{dotted key: value}} overrides")
        object.__setattr__(self, "k_overrides", {int(k): dict(v) for k, v in self.k_overrides.items()})  # YAML/JSON keys
        for k, over in self.k_overrides.items():
            bad = sorted(key for key in over if not _run_key_path(str(key)))
            _check(not bad, f"config key '{p}k_overrides.{k}': {bad} not in a run's sections {sorted(_RUN_SECTIONS)} "
                            f"or study.{{{', '.join(sorted(_RUN_STUDY_KEYS))}}}")
        _check(isinstance(self.recipes, dict) and all(isinstance(v, dict) for v in self.recipes.values()),
               f"config key '{p}recipes' must map a name to classify overrides")
        for name, over in self.recipes.items():
            bad = sorted(set(over) - {f.name for f in dataclasses.fields(ClassifyConfig)})
            _check(not bad, f"config key '{p}recipes.{name}': unknown classify key(s) {bad}")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking: MLflow runs and TensorBoard event files (docs/tracking.md)."""

    mlflow_uri: str = _f("", "MLflow tracking URI (e.g. http://127.0.0.1:5000): one parent run per `synthaug run` / `study`, a child per stage, classifier run and sweep trial; '' = no MLflow (nothing of it is imported).")
    experiment: str = _f("synthaug", "MLflow experiment the runs go to (created when missing).")
    tensorboard: bool = _f(True, "Write TensorBoard event files under <work_dir>/<name>/tensorboard/<command>-<time>/ (the same metrics as MLflow); false = none.")
    log_every: int = _f(10, "Log generator-training metrics every N optimiser steps (classifiers log every epoch).")

    def __post_init__(self) -> None:
        _check_tracking(self, _prefix(self))


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray."""

    address: str = _f("", "Ray address; '' starts (or joins, under `ray job submit`) a local Ray.")
    num_cpus: int = _f(8, "Logical CPUs for a local Ray (more than the workers need, so Ray Data never starves).")
    include_dashboard: bool = _f(True, "Dashboard on a local Ray (Train V2 cleans placement groups through it).")

    def __post_init__(self) -> None:
        _check_ray(self, _prefix(self))


@dataclass(frozen=True)
class Config:
    """The whole run: top-level fields plus one section per stage."""

    name: str = _f("default", "Run name; results go to <results_dir>/<name>.")
    results_dir: str = _f("results", "Where reports (metrics, tables, plots) land; committed.")
    work_dir: str = _f("runs", "Where datasets, checkpoints and caches land; git-ignored.")
    shared_mount: bool = _f(False, "Local work_dir and results_dir are on a mount every Ray node sees (NFS, EFS, Lustre): allows them on a cluster of more than one node, where a local path is otherwise refused before any work (use an s3:// URI, or this).")
    allow_downloads: bool = _f(False, "Allow hub downloads (off: every path is local).")
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={"help": "Ingest stage."})
    pretrain: TrainGenConfig = field(default_factory=TrainGenConfig, metadata={"help": "Generator pretraining on the pool."})
    finetune: TrainGenConfig = field(default_factory=lambda: TrainGenConfig(steps=800, lr=1e-3), metadata={"help": "Class-conditional fine-tuning."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Sampling stage."})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"help": "Evaluation stage."})
    classify: ClassifyConfig = field(default_factory=ClassifyConfig, metadata={"help": "Classifier stage."})
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig, metadata={"help": "Pseudo-label baseline."})
    filter: FilterConfig = field(default_factory=FilterConfig, metadata={"help": "Confidence filtering of synthetic sets."})
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata={"help": "Sweep stage."})
    study: StudyConfig = field(default_factory=StudyConfig, metadata={"help": "Study over k x subset draws (`synthaug study`)."})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray connection."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "Experiment tracking (MLflow, TensorBoard)."})

    def __post_init__(self) -> None:
        validate(self)


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), globals())  # resolve postponed annotations
    if typing.get_origin(tp) is Literal:
        # A choice: read as a string; the section's __post_init__ names the choices.
        return "" if value is None else str(value)
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
    hints = _hints(cls)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    token = _PREFIX.set(prefix)  # so the section's checks name 'finetune.steps', not 'steps'
    try:
        return cls(**kwargs)
    finally:
        _PREFIX.reset(token)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def _yaml(read, where: str) -> Any:
    """YAML from ``read()`` (bytes); a syntax or encoding error is a ConfigError naming ``where``, line and column."""
    try:
        return yaml.safe_load(read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(e, "problem", None), getattr(e, "context", None)) if x) or str(e)
        raise ConfigError(f"{where}: YAML syntax error{at}: {what}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
                base: Config | None = None) -> Config:
    """Load a YAML config (or ``base``, or the defaults) and apply overrides.

    ``overrides``: the command line's ``key.sub=value`` strings (values read as YAML), or a
    mapping of dotted keys to Python values, where a section may also take a mapping of its
    keys (``{"sample": {"per_class": 4}}`` = ``{"sample.per_class": 4}``).
    """
    tree: dict = to_dict(base) if base is not None else {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = _yaml(p.read_bytes, str(p)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    for key, value in override_items(overrides):
        _set_dotted(tree, key, value)
    return _build(Config, tree)


def override_items(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` pairs of overrides given as ``key=value`` strings or as a mapping."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, Mapping):
        out = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override '{item}' must look like key.sub=value")
            key, raw = item.split("=", 1)
            out.append((key.strip(), _yaml(raw.encode, f"override '{item}'") if raw else ""))
        return out
    return list(_flatten(Config, overrides, ""))


def _flatten(cls: type | None, mapping: Mapping, prefix: str):
    """Dotted keys of a mapping, descending into the values given for sections (dataclass fields)."""
    for key, value in mapping.items():
        node = cls
        for part in str(key).split("."):
            hint = _hints(node).get(part) if node is not None else None
            node = hint if dataclasses.is_dataclass(hint) else None
        if node is not None and isinstance(value, Mapping):
            yield from _flatten(node, value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as generative.models reads a base
# Every config key that names a local-or-remote location (comma-separated lists for kd_teacher).
LOCATION_KEYS = ("work_dir", "results_dir", "ingest.path", "ingest.test_path", "pretrain.data", "pretrain.base",
                 "pretrain.extra_data", "finetune.data", "finetune.base", "finetune.extra_data", "sample.source",
                 "evaluate.inception_weights", "classify.pretrained_path", "classify.kd_teacher")


def absolute_locations(cfg: Config) -> Config:
    """``cfg`` with every local location (:data:`LOCATION_KEYS`) made absolute, once, in the driver.

    Ray tasks and workers on another node resolve a relative path against their own working
    directory, so the driver resolves them before anything is passed on; URIs stay as they are.
    """
    from synthaug import storage

    def fix(value: Any, hub_ok: bool) -> Any:
        if isinstance(value, (tuple, list)):
            return tuple(fix(v, hub_ok) for v in value)
        if not isinstance(value, str) or not value.strip():
            return value
        if "," in value:  # a comma-separated list of locations
            return ",".join(fix(v.strip(), hub_ok) for v in value.split(",") if v.strip())
        if hub_ok and HUB_ID.match(value) and not os.path.exists(value):  # a hub id, fetched (or refused) later
            return value
        return storage.absolute(value)

    changes: dict = {}
    for key in LOCATION_KEYS:
        node, *rest = key.split(".")
        value = getattr(cfg, node) if not rest else getattr(getattr(cfg, node), rest[0])
        new = fix(value, key.endswith(".base"))
        if new != value:
            changes[key] = new
    return load_config(None, changes, base=cfg) if changes else cfg


def reference_markdown(cls: type = Config, prefix: str = "", defaults: Any = None) -> str:
    """The config reference as a markdown table (key, default, help).

    A section's defaults are the values its parent gives it (``Config().finetune`` is not
    ``TrainGenConfig()``), so nested sections are described from the parent's instance.
    """
    rows = []
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows.append(reference_markdown(type(value), prefix + f.name + ".", value).strip())
            continue
        rows.append(f"| `{prefix}{f.name}` | `{value!r}` | {f.metadata.get('help', '')} |")
    if prefix:
        return "\n".join(rows) + "\n"
    head = "| key | default | meaning |\n| --- | --- | --- |\n"
    return head + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- validation


_PREFIX: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthaug_config_prefix", default=None)
# The key prefix of a section built directly (SampleConfig(...)), for the messages.
_DEFAULT_PREFIX = {"IngestConfig": "ingest.", "TrainGenConfig": "", "SampleConfig": "sample.", "EvaluateConfig": "evaluate.",
                   "ClassifyConfig": "classify.", "PseudoLabelConfig": "pseudolabel.",
                   "FilterConfig": "filter.", "SweepConfig": "sweep.", "StudyConfig": "study.", "RayConfig": "ray.",
                   "TrackingConfig": "tracking."}


def _prefix(section: Any) -> str:
    p = _PREFIX.get()
    return _DEFAULT_PREFIX.get(type(section).__name__, "") if p is None else p


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def choices(cls: type, key: str) -> tuple:
    """The allowed values of a ``Literal`` field."""
    return typing.get_args(_hints(cls)[key])


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


def _check_choices(section: Any, p: str) -> None:
    """Every ``Literal`` field holds one of its choices (types are checked by ``_coerce``)."""
    for f in dataclasses.fields(section):
        allowed = typing.get_args(_hints(type(section))[f.name]) if typing.get_origin(_hints(type(section))[f.name]) is Literal else None
        if allowed is not None:
            value = getattr(section, f.name)
            _check(value in allowed, f"config key '{p}{f.name}': unknown {f.name} {value!r}; choose from {list(allowed)}")


def _check_ingest(i: IngestConfig, p: str) -> None:
    _check_choices(i, p)
    _check(0.0 < i.val_fraction < 1.0, f"config key '{p}val_fraction' must be in (0, 1)")
    _check(0.0 <= i.test_fraction < 1.0 - i.val_fraction,
           f"config key '{p}test_fraction' must be in [0, 1 - val_fraction)")
    _check(not (i.test_fraction and i.test_path), f"config keys '{p}test_fraction' and '{p}test_path' exclude each other")
    _check(not i.test_path or i.source != "digits", f"config key '{p}test_path': the digits source has no test file (use test_fraction)")
    _check(i.k_per_class >= 0, f"config key '{p}k_per_class' must be >= 0")
    _check(i.image_size >= 0, f"config key '{p}image_size' must be >= 0")
    _check(i.chunk_size >= 1, f"config key '{p}chunk_size' must be >= 1")
    _check(i.source == "digits" or bool(i.path), f"config key '{p}path': source {i.source!r} needs a path")


def _check_train(t: TrainGenConfig, p: str) -> None:
    _check_choices(t, p)
    _check(bool(t.family), f"config key '{p}family' must name a generator family")
    _check(t.steps >= 1, f"config key '{p}steps' must be >= 1")
    _check(t.num_workers >= 1, f"config key '{p}num_workers' must be >= 1")
    _check(t.batch_size >= t.num_workers, f"config key '{p}batch_size' must be >= {p}num_workers")
    _check(t.lr > 0, f"config key '{p}lr' must be > 0")
    _check(0.0 <= t.label_dropout <= 1.0, f"config key '{p}label_dropout' must be in [0, 1]")
    _check(0.0 <= t.ema_decay < 1.0, f"config key '{p}ema_decay' must be in [0, 1)")
    _check(t.grad_accum >= 1, f"config key '{p}grad_accum' must be >= 1")
    _check(t.warmup_steps >= 0, f"config key '{p}warmup_steps' must be >= 0")
    _check(t.checkpoint_every >= 1, f"config key '{p}checkpoint_every' must be >= 1")
    _check(t.max_failures >= 0, f"config key '{p}max_failures' must be >= 0")
    _check(t.shuffle_buffer >= 0, f"config key '{p}shuffle_buffer' must be >= 0")
    _check(t.shuffle_buffer_mb >= 1, f"config key '{p}shuffle_buffer_mb' must be >= 1")
    _check(t.val_grid_every >= 0, f"config key '{p}val_grid_every' must be >= 0")
    _check(t.min_snr_gamma >= 0, f"config key '{p}min_snr_gamma' must be >= 0")
    problem = prompt_template_problem(t.prompt_template, f"{p}prompt_template")
    _check(problem is None, problem or "")
    _check(t.lora_rank >= 0, f"config key '{p}lora_rank' must be >= 0")
    _check(t.lora_rank == 0 or t.family == "text2image", f"config key '{p}lora_rank': LoRA is implemented for family 'text2image' only, not {t.family!r}")
    _check(not (t.latent_cache and t.family == "unet"), f"config key '{p}latent_cache': family 'unet' has no VAE (it trains in pixel space)")


def _check_sample(s: SampleConfig, p: str) -> None:
    _check_choices(s, p)
    _check(s.steps >= 1, f"config key '{p}steps' must be >= 1")
    _check(s.guidance_scale >= 0, f"config key '{p}guidance_scale' must be >= 0")
    _check(s.per_class >= 1, f"config key '{p}per_class' must be >= 1 (N = 0 samples nothing)")
    for name, n in s.class_counts.items():
        _check(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
               f"config key '{p}class_counts.{name}' must be an integer >= 1 (N = 0 samples nothing)")
    _check(s.batch_size >= 1, f"config key '{p}batch_size' must be >= 1")
    _check(s.chunk_size >= 0, f"config key '{p}chunk_size' must be >= 0 (0 = {p}batch_size)")
    _check(1 <= s.min_actors <= s.max_actors, f"config keys '{p}min_actors' <= '{p}max_actors', both >= 1")
    _check(s.num_gpus_per_actor >= 0, f"config key '{p}num_gpus_per_actor' must be >= 0")
    _check(0.0 < s.strength <= 1.0, f"config key '{p}strength' must be in (0, 1], got {s.strength}")
    _check(s.init != "real" or int(s.steps * s.strength) >= 1,
           f"config keys '{p}strength' x '{p}steps' = {s.strength} x {s.steps} leaves no denoising step "
           f"(int(steps * strength) must be >= 1)")


def _check_evaluate(e: EvaluateConfig, p: str) -> None:
    _check_choices(e, p)
    for key in ("max_samples", "batch_size", "near_copy_chunk", "min_actors", "kid_subset_size", "near_copy_top_k"):
        _check(getattr(e, key) >= 1, f"config key '{p}{key}' must be >= 1")
    _check(e.max_actors >= e.min_actors, f"config keys '{p}min_actors' <= '{p}max_actors'")
    _check(0.0 <= e.near_copy_percentile <= 100.0, f"config key '{p}near_copy_percentile' must be in [0, 100]")
    _check(e.extractor_epochs >= 1, f"config key '{p}extractor_epochs' must be >= 1")
    _check(e.num_gpus_per_actor >= 0, f"config key '{p}num_gpus_per_actor' must be >= 0")


def _check_classify(c: ClassifyConfig, p: str) -> None:
    _check(bool(c.model), f"config key '{p}model' must name a timm model")
    _check(c.epochs >= 1, f"config key '{p}epochs' must be >= 1")
    _check(c.shuffle_buffer_mb >= 1, f"config key '{p}shuffle_buffer_mb' must be >= 1")
    _check(c.checkpoint_every >= 1, f"config key '{p}checkpoint_every' must be >= 1")
    _check(c.eval_every >= 1, f"config key '{p}eval_every' must be >= 1")
    _check(c.epoch_images >= 0, f"config key '{p}epoch_images' must be >= 0")
    _check(len(c.seeds) >= 1, f"config key '{p}seeds' must list at least one seed")
    _check(all(isinstance(x, int) and not isinstance(x, bool) for x in c.seeds), f"config key '{p}seeds' must list integers, got {list(c.seeds)}")
    _check(c.num_workers >= 1, f"config key '{p}num_workers' must be >= 1")
    _check(c.cpus_per_worker >= 1, f"config key '{p}cpus_per_worker' must be >= 1")
    _check(c.batch_size >= c.num_workers, f"config key '{p}batch_size' must be >= {p}num_workers")
    _check(c.lr > 0, f"config key '{p}lr' must be > 0")
    ok = len(c.crop_scale) == 2 and all(isinstance(x, (int, float)) for x in c.crop_scale)
    _check(ok and 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1, f"config key '{p}crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1")
    ok = len(c.crop_ratio) == 2 and all(isinstance(x, (int, float)) for x in c.crop_ratio)
    _check(ok and 0 < c.crop_ratio[0] <= c.crop_ratio[1], f"config key '{p}crop_ratio' must be [lo, hi] with 0 < lo <= hi")
    _check(c.color_jitter >= 0, f"config key '{p}color_jitter' must be >= 0")
    for key in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
        _check(0.0 <= getattr(c, key) <= 1.0, f"config key '{p}{key}' must be in [0, 1]")
    _check(c.mixup_alpha >= 0 and c.cutmix_alpha >= 0, f"config keys '{p}mixup_alpha' and '{p}cutmix_alpha' must be >= 0")
    _check(0.0 < c.model_ema_decay < 1.0, f"config key '{p}model_ema_decay' must be in (0, 1)")
    _check(c.warmup_epochs >= 0, f"config key '{p}warmup_epochs' must be >= 0")
    _check(c.max_failures >= 0, f"config key '{p}max_failures' must be >= 0")
    _check(c.added_batch >= 0, f"config key '{p}added_batch' must be >= 0")
    _check(c.added_weight >= 0, f"config key '{p}added_weight' must be >= 0")
    _check(not c.kd_teacher or c.added_batch > 0, f"config key '{p}kd_teacher' needs two-stream batches ({p}added_batch > 0)")
    _check(0.0 <= c.kd_weight <= 1.0, f"config key '{p}kd_weight' must be in [0, 1]")
    _check(c.kd_temperature > 0, f"config key '{p}kd_temperature' must be > 0")


def _check_pseudolabel(c: PseudoLabelConfig, p: str) -> None:
    _check_choices(c, p)
    _check(0.0 <= c.threshold <= 1.0, f"config key '{p}threshold' must be in [0, 1]")
    _check(0.0 < c.top_fraction <= 1.0, f"config key '{p}top_fraction' must be in (0, 1]")
    _check(c.batch_size >= 1, f"config key '{p}batch_size' must be >= 1")
    _check(1 <= c.min_actors <= c.max_actors, f"config keys '{p}min_actors' <= '{p}max_actors', both >= 1")
    _check(c.num_gpus_per_actor >= 0, f"config key '{p}num_gpus_per_actor' must be >= 0")


def _check_sweep(w: SweepConfig, p: str) -> None:
    _check(len(w.guidance_scales) >= 1 and len(w.ratios) >= 1, f"config keys '{p}guidance_scales' and '{p}ratios' must not be empty (empty grid)")
    for r in w.ratios:
        _check(isinstance(r, (int, float)) and not isinstance(r, bool), f"config key '{p}ratios': {r!r} is not a number")
        _check(float(r) >= 0, f"config key '{p}ratios': ratio {r} < 0")
    for g in w.guidance_scales:
        _check(isinstance(g, (int, float)) and not isinstance(g, bool), f"config key '{p}guidance_scales': {g!r} is not a number")
        _check(float(g) >= 0, f"config key '{p}guidance_scales': guidance {g} < 0")
    for st in w.strengths:
        _check(st is None or (isinstance(st, (int, float)) and not isinstance(st, bool) and 0 < float(st) <= 1),
               f"config key '{p}strengths': {st!r} is not null or a strength in (0, 1]")
    _check(len(set(w.strengths)) == len(w.strengths), f"config key '{p}strengths' lists a value twice")
    for t in w.taus:
        _check(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= float(t) <= 1,
               f"config key '{p}taus': {t!r} is not a threshold in [0, 1]")
    _check(len(set(w.taus)) == len(w.taus), f"config key '{p}taus' lists a value twice")
    _check(w.max_concurrent >= 1, f"config key '{p}max_concurrent' must be >= 1")
    _check(bool(w.name) and "/" not in w.name, f"config key '{p}name' must be a non-empty name without '/'")


def _check_tracking(t: TrackingConfig, p: str) -> None:
    uri = t.mlflow_uri
    _check(not uri or "://" in uri or uri.startswith("/") or uri == "databricks",
           f"config key '{p}mlflow_uri': {uri!r} is not a tracking URI (e.g. http://127.0.0.1:5000, sqlite:///mlflow.db)")
    _check(bool(t.experiment), f"config key '{p}experiment' must name an MLflow experiment")
    _check(t.log_every >= 1, f"config key '{p}log_every' must be >= 1")


def _check_ray(r: RayConfig, p: str) -> None:
    _check(r.num_cpus >= 1, f"config key '{p}num_cpus' must be >= 1")


def validate(cfg: Config) -> None:
    """Checks across sections (each section checks itself in its ``__post_init__``)."""
    _check(bool(cfg.name) and "/" not in cfg.name, "config key 'name' must be a non-empty name without '/'")
    _check(bool(cfg.work_dir), "config key 'work_dir' must not be empty")
    _check(bool(cfg.results_dir), "config key 'results_dir' must not be empty")
    for st in cfg.sweep.strengths:
        _check(st is None or int(cfg.sample.steps * float(st)) >= 1,
               f"config keys 'sweep.strengths' x 'sample.steps' = {st} x {cfg.sample.steps} leaves no denoising step "
               "(int(steps * strength) must be >= 1)")
    for k, over in cfg.study.k_overrides.items():  # each k's run config builds (a misspelled key fails here, not mid-study)
        try:
            load_config(None, {**over, "study.k_overrides": {}}, base=cfg)
        except ConfigError as e:
            raise ConfigError(f"config key 'study.k_overrides.{k}': {e}") from None
