"""The classifier's plain-PyTorch core: one epoch, streamed evaluation, the recipe's builders.

Nothing here imports Ray: ``train_epoch`` and ``evaluate`` take any iterable of batches,
so they run the same under Ray Train, in a Tune trial, in a benchmark or in a test.

Evaluation is split in two so that it can be sharded: ``eval_counts`` returns sums
(top-1 / top-k hits, per-class hits and totals) that add across batches and across
workers (an all-reduce), and ``metrics_from_counts`` turns the summed counts into
percentages. Top-k hits come from ``timm.utils.accuracy``.

Checkpoint files (``write_checkpoint`` / ``read_checkpoint``): ``model.safetensors`` (the
unwrapped model's state), ``ema.safetensors`` (with ``model_ema``), ``state.pt``
(optimizer state, epoch, update count, elapsed seconds: tensors and plain containers,
loadable with ``torch.load(weights_only=True)``) and ``classifier.json``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from synthaug.classify.augment import MixupCutmix, _seed, enabled as mixup_enabled
from synthaug.classify.domain import has_domain_bn, set_domain
from synthaug.config import ClassifyConfig
from synthaug.malloc import Trimmer, trim


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    device: torch.device | str,
    *,
    step: int = 0,
    seed: int = 0,
    mixup: MixupCutmix | None = None,
    ema: Any = None,
    amp: bool = False,
    channels_last: bool = False,
    added_weight: float = 1.0,
    kd: "Distiller | None" = None,
) -> dict:
    """One pass over ``batches`` ({"image": (B, C, H, W) float, "label": (B,), "domain": (B,) bool}).

    ``step`` is the global update count so far: the timm scheduler is stepped per update
    (``step_update``), Mixup is seeded from (seed, step), and the EMA is updated after each
    optimiser step. Returns ``{"train_loss", "images", "seconds", "step"}`` for this process.
    """
    model.train()
    bare = model.module if hasattr(model, "module") else model
    split_bn = has_domain_bn(bare)
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    fmt = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    loss_sum, n, t0 = 0.0, 0, time.perf_counter()
    trimmer = Trimmer()  # freed batch buffers back to the OS now and then (synthaug.malloc)
    for batch in batches:
        trimmer.tick()
        x = batch["image"].to(device, non_blocking=True).to(memory_format=fmt)  # (B, C, H, W)
        y = batch["label"].to(device, non_blocking=True)  # (B,)
        domain = batch.get("domain")
        n_real = int(batch.get("n_real", len(y)))  # two-stream batches: the first n_real rows are real
        if mixup is not None:  # each stream mixed within itself
            x, target, y, domain, n_real = _mix_streams(mixup, x, y, domain, n_real, _seed(seed, step))
            if len(y) == 0:
                continue
        else:
            target = y
        if split_bn:
            set_domain(bare, domain.to(device) if domain is not None else None)
        with autocast:
            logits = model(x)
            if n_real == len(y):
                loss = loss_fn(logits, target)
            else:  # real loss + added_weight x added loss (soft targets on the added rows with a teacher)
                added = loss_fn(logits[n_real:], target[n_real:])
                if kd is not None:
                    added = (1 - kd.weight) * added + kd.weight * kd.loss(logits[n_real:], x[n_real:])
                real = loss_fn(logits[:n_real], target[:n_real]) if n_real else 0.0
                loss = real + added_weight * added
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if scheduler is not None:
            scheduler.step_update(num_updates=step)
        if ema is not None:
            ema.update(bare, step=step)
        loss_sum += float(loss.detach()) * len(y)
        n += len(y)
    if split_bn:
        set_domain(bare, None)
    if trimmer.every:
        trim()
    return {"train_loss": loss_sum / max(n, 1), "images": n, "seconds": time.perf_counter() - t0, "step": step}


# ----------------------------------------------------------------------------- evaluation


def _mix_streams(mixup: MixupCutmix, x, y, domain, n_real: int, seed: int):
    """timm Mixup/CutMix on each stream of a batch separately (one stream: the whole batch).

    Mixup pairs a batch with its reverse and wants even sizes, so each stream drops its odd row.
    Returns (x, soft targets, labels, domain, real rows) of the rows kept, real rows first.
    """
    two = n_real < len(y)
    cuts = [(0, n_real), (n_real, len(y))] if two else [(0, len(y))]
    xs, ts, ys, ds = [], [], [], []
    for i, (a, b) in enumerate(cuts):
        b = a + (b - a) - (b - a) % 2
        if b <= a:
            continue
        xi, ti = mixup(x[a:b], y[a:b], seed=seed + i)
        xs.append(xi), ts.append(ti), ys.append(y[a:b]), ds.append(domain[a:b] if domain is not None else None)
    if not xs:
        return x[:0], y[:0], y[:0], domain[:0] if domain is not None else None, 0
    y = torch.cat(ys)
    kept_real = n_real - n_real % 2 if two else len(y)
    return torch.cat(xs), torch.cat(ts), y, torch.cat(ds) if domain is not None else None, kept_real


def two_stream(real: Iterable[dict], added: Iterable[dict]) -> Iterable[dict]:
    """Each step's real batch followed by its added batch, as one batch with ``n_real``."""
    for r, a in zip(real, added):
        yield {"image": torch.cat([r["image"], a["image"]]), "label": torch.cat([r["label"], a["label"]]),
               "domain": torch.cat([r["domain"], a["domain"]]), "n_real": len(r["label"])}


class Distiller:
    """Soft targets from saved classifiers: their averaged probabilities at temperature T.

    ``loss(student_logits, x)`` is ``T^2 KL(teacher_T || student_T)`` (Hinton et al.), on the
    same (augmented, mixed) images the student sees. ``weight`` is ``classify.kd_weight``.
    """

    def __init__(self, locations: list[str], cfg: ClassifyConfig, device):
        from synthaug.classify.models import load_classifier

        self.models = [load_classifier(loc)[0].to(device).eval() for loc in locations]
        self.temperature, self.weight = float(cfg.kd_temperature), float(cfg.kd_weight)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(x).float() / self.temperature, dim=1) for m in self.models]).mean(0)

    def loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        target = self.probabilities(x)
        log_p = torch.log_softmax(logits.float() / t, dim=1)
        return torch.nn.functional.kl_div(log_p, target, reduction="batchmean") * t * t


def count_width(num_classes: int) -> int:
    """Length of an ``eval_counts`` vector: [n, top1, topk, per-class hits..., per-class totals...]."""
    return 3 + 2 * num_classes


@torch.no_grad()
def eval_counts(models: dict[str, nn.Module], batches: Iterable[dict], num_classes: int,
                device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Sums over ``batches`` ({"image": (B, C, H, W) float, "label": (B,)}) for each model, in one pass.

    Each value is a float64 vector (``count_width``) that adds across batches and workers.
    """
    from timm.utils import accuracy

    device = torch.device(device)
    k = min(5, num_classes)
    out = {name: np.zeros(count_width(num_classes), np.float64) for name in models}
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    trimmer = Trimmer()
    try:
        for batch in batches:
            trimmer.tick()
            x = torch.as_tensor(batch["image"], dtype=torch.float32).to(device)  # (B, C, H, W)
            y = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.int64).to(device)  # (B,)
            b = len(y)
            if b == 0:
                continue
            totals = np.bincount(y.cpu().numpy(), minlength=num_classes)[:num_classes]
            for name, m in models.items():
                logits = m(x).float()  # (B, K)
                top1, topk = accuracy(logits, y, topk=(1, k))  # percentages of this batch
                hits = (logits.argmax(dim=1) == y).cpu().numpy()
                c = out[name]
                c[0] += b
                c[1] += round(float(top1) * b / 100.0)
                c[2] += round(float(topk) * b / 100.0)
                c[3:3 + num_classes] += np.bincount(y.cpu().numpy()[hits], minlength=num_classes)[:num_classes]
                c[3 + num_classes:] += totals
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return out


def metrics_from_counts(counts: np.ndarray, num_classes: int) -> dict:
    """Top-1 / top-5 in % (top-k capped at the class count) and per-class top-1 (NaN if absent)."""
    n = max(float(counts[0]), 1.0)
    hits, totals = counts[3:3 + num_classes], counts[3 + num_classes:]
    per_class = [float(h / t * 100) if t > 0 else float("nan") for h, t in zip(hits, totals)]
    return {"top1": float(counts[1] / n * 100), "top5": float(counts[2] / n * 100), "per_class_top1": per_class}


def evaluate(model: nn.Module, batches: Iterable[dict], num_classes: int, device: torch.device | str | None = None) -> dict:
    """Top-1 / top-5 / per-class top-1 of one model over a stream of batches, in this process."""
    device = device or next(model.parameters()).device
    return metrics_from_counts(eval_counts({"m": model}, batches, num_classes, device)["m"], num_classes)


def array_batches(images, labels, batch_size: int = 512) -> Iterable[dict]:
    """Batches of in-memory arrays (tests, benchmarks): images float (N, C, H, W), labels (N,)."""
    labels = np.asarray(labels)
    for i in range(0, len(labels), batch_size):
        yield {"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}


# ----------------------------------------------------------------------------- recipe


def build_optimizer(model: nn.Module, cfg: ClassifyConfig) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` (no weight decay on biases and norm parameters)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ClassifyConfig, steps_per_epoch: int):
    """timm ``create_scheduler_v2``: linear warm-up then cosine to ``min_lr_factor x lr``, stepped per update.

    Its lr is a function of the update count alone (``step_update``), which is what makes
    resuming -- also with more epochs -- exact without restoring scheduler state.
    """
    from timm.scheduler import create_scheduler_v2

    floor = cfg.lr * cfg.min_lr_factor
    warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=floor, warmup_lr=floor, warmup_epochs=warmup,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def build_loss(cfg: ClassifyConfig) -> nn.Module:
    """Soft-target cross-entropy under Mixup/CutMix (its targets carry the smoothing), else smoothed CE."""
    if mixup_enabled(cfg):
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def classifier_meta(cfg: ClassifyConfig, class_names, in_chans: int, image_size) -> dict:
    """What ``load_classifier`` needs to rebuild the model."""
    return {
        "model": cfg.model, "num_classes": len(class_names), "in_chans": int(in_chans),
        "class_names": list(class_names), "image_size": [int(v) for v in image_size], "domain_bn": bool(cfg.domain_bn),
        "weights": "ema" if cfg.model_ema else "model",
    }


# ----------------------------------------------------------------------------- checkpoints


def _state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def write_checkpoint(path: Path, model: nn.Module, ema, optimizer, epoch: int, step: int, seconds: float, meta: dict,
                     counters: dict[str, int] | None = None) -> None:
    """A checkpoint directory (see the module docstring) in the local dir ``path``; ``counters``: more ints for ``state.pt``."""
    save_file(_state(model), str(path / "model.safetensors"))
    if ema is not None:
        save_file(_state(ema.module), str(path / "ema.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "epoch": torch.tensor(epoch),
        "step": torch.tensor(step),
        "seconds": torch.tensor(seconds, dtype=torch.float64),
        **{k: torch.tensor(int(v)) for k, v in (counters or {}).items()},
    }
    torch.save(state, path / "state.pt")
    (path / "classifier.json").write_text(json.dumps(meta, indent=2))


def read_checkpoint(path: Path, model: nn.Module, ema) -> dict:
    """Load weights into ``model`` (and ``ema``); returns ``state.pt`` (optimizer, epoch, step, seconds)."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if ema is not None:
        ema.module.load_state_dict(load_file(str(path / "ema.safetensors")))
    return torch.load(path / "state.pt", weights_only=True)
