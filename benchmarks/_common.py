"""Shared helpers of the benchmarks: machine description, load, tables, JSON, GPU ceilings.

Every benchmark writes ``results/bench/<name>.json`` holding the command that produced
it, the machine, the settings and the measured numbers, and prints a table. Nothing
here changes what is measured; it only records it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "bench"
WORK = ROOT / "runs" / "bench"  # git-ignored: ingested data, generators, extractor, samples

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import torch  # noqa: E402  (after the environment above)

DEFAULT_TORCH_THREADS = torch.get_num_threads()  # before any benchmark sets it to 1


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """CPU model, cores, library versions and the accelerator (if any)."""
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": DEFAULT_TORCH_THREADS,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    for mod in ("ray", "diffusers", "timm"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages (other processes share this machine)."""
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet(max_load: float, timeout_s: float = 180.0) -> list[float]:
    """Wait (up to ``timeout_s``) until the 1-minute load is below ``max_load``; returns the load."""
    t0 = time.time()
    while os.getloadavg()[0] > max_load and time.time() - t0 < timeout_s:
        time.sleep(5)
    return load()


def command() -> str:
    """The command line that produced a result, relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


# ----------------------------------------------------------------------------- output


def table(rows: list[dict], cols: list[str], title: str = "") -> str:
    """A plain-text table of ``rows`` (dicts) over ``cols``; floats to 3 significant places."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = ([title] if title else []) + [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def code_version() -> dict:
    """The commit the library was at, and whether synthaug/ had uncommitted changes."""
    import subprocess

    def git(*a) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD"), "synthaug_uncommitted": git("status", "--porcelain", "--", "synthaug").splitlines()}


def write_result(name: str, payload: dict, path: str | Path | None = None) -> Path:
    """Write ``results/bench/<name>.json`` with the command and machine first."""
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": command(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "code": code_version(), "machine": machine(), **payload}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return out


# ----------------------------------------------------------------------------- data and Ray


def digits(work: Path = WORK) -> dict[str, Path]:
    """Digits ingested in the low-data regime (k = 10 per class) under ``runs/bench/data``."""
    from synthaug.config import load_config
    from synthaug.data import ingest

    out = work / "data"
    splits = ("train", "val", "pool", "train_full")
    if not all((out / s / "manifest.json").is_file() for s in splits):
        ingest.run(load_config(None, ["ingest.k_per_class=10"]), out)
    return {s: out / s for s in splits}


def ray_worker_threads() -> dict:
    """torch's intra-op thread count inside a 1-CPU Ray task (what Ray workers run with)."""
    import ray

    @ray.remote(num_cpus=1)
    def probe():
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "niceness": os.getpriority(os.PRIO_PROCESS, 0)}

    return ray.get(probe.remote())


@contextlib.contextmanager
def nice_as(level: int):
    """Run the block at CPU niceness ``level`` (Ray's workers run at 15), then restore.

    On a shared machine a nice-0 plain loop would get more CPU than the nice-15 Ray
    worker it is compared with; matching the niceness makes them compete alike.
    Restoring a lower niceness needs root; without it the block runs unchanged.
    """
    old = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, level)
        os.setpriority(os.PRIO_PROCESS, 0, old)  # check we can come back before committing
        os.setpriority(os.PRIO_PROCESS, 0, level)
    except PermissionError:
        yield old
        return
    try:
        yield level
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, old)


# ----------------------------------------------------------------------------- GPU helpers


def bf16_matmul_ceiling(device: str = "cuda", n: int = 8192, iters: int = 50) -> float:
    """Measured dense bf16 matmul throughput (FLOP/s): the MFU denominator."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    seconds = time_cuda(lambda: a @ b, iters, device)
    return 2 * n**3 / seconds


def time_cuda(fn, iters: int, device: str = "cuda") -> float:
    """Mean seconds per call of ``fn`` (synchronised; CUDA events on GPU, wall clock elsewhere)."""
    import torch

    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (forward, and backward if ``fn`` runs it), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# Large generators with random weights, for the --gpu modes (no Ray, no downloads).
# name: (diffusers class, constructor kwargs, latent channels, latent size at 256 px / 8)
GPU_MODELS = {
    # DiT-B/2 (Peebles & Xie 2023): 12 layers, hidden 768 (12 heads x 64), patch 2, 32x32x4 latents
    # of 256 px images, learned sigma (8 output channels), 1000 classes + null.
    "dit-b-2": ("DiTTransformer2DModel", dict(num_attention_heads=12, attention_head_dim=64, in_channels=4,
                                              out_channels=8, num_layers=12, patch_size=2, sample_size=32,
                                              num_embeds_ada_norm=1000)),
    # DiT-XL/2: 28 layers, hidden 1152 (16 heads x 72), patch 2: the estimate's `finetune.family=dit` denoiser.
    "dit-xl-2": ("DiTTransformer2DModel", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                               out_channels=8, num_layers=28, patch_size=2, sample_size=32,
                                               num_embeds_ada_norm=1000)),
    # Stable Diffusion 1.x UNet (~860M parameters), text cross-attention of width 768 over 77 tokens.
    "sd-unet": ("UNet2DConditionModel", dict(sample_size=32, in_channels=4, out_channels=4, cross_attention_dim=768,
                                             attention_head_dim=8, layers_per_block=2,
                                             block_out_channels=(320, 640, 1280, 1280))),
}


def build_gpu_model(name: str, image_px: int = 256, **overrides):
    """A randomly initialised large denoiser and a function making its inputs for a batch.

    Returns ``(model, inputs)`` with ``inputs(batch, device) -> kwargs`` for ``model(**kwargs)``;
    latents are ``image_px / 8`` square with 4 channels (an SD-style VAE's latent space).
    """
    import diffusers
    import torch

    cls_name, kwargs = GPU_MODELS[name]
    latent = image_px // 8
    kwargs = {**kwargs, "sample_size": latent, **overrides}
    model = getattr(diffusers, cls_name)(**kwargs)
    channels = kwargs["in_channels"]

    def inputs(batch: int, device) -> dict:
        x = torch.randn(batch, channels, latent, latent, device=device)  # (B, 4, h, w)
        t = torch.randint(0, 1000, (batch,), device=device)
        if cls_name == "DiTTransformer2DModel":
            return {"hidden_states": x, "timestep": t, "class_labels": torch.randint(0, 1000, (batch,), device=device)}
        ctx = torch.randn(batch, 77, kwargs["cross_attention_dim"], device=device)  # (B, 77, D) text states
        return {"sample": x, "timestep": t, "encoder_hidden_states": ctx}

    return model, inputs


def build_gpu_vae():
    """A randomly initialised SD-size VAE (AutoencoderKL, 4 latent channels, 8x down-sampling)."""
    import diffusers

    return diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)


def gpu_record(stage: str, model: str, image_size: int, images_per_s: float, device_name: str, **extra) -> dict:
    """One ``gpu_throughput`` entry: what ``synthaug estimate`` reads as a measured figure for a stage."""
    return {"stage": stage, "model": model, "image_size": int(image_size), "images_per_s": float(images_per_s),
            "device_name": device_name, **extra}


def gpu_output(out):
    """The denoiser's output tensor, whatever the diffusers output class."""
    return out.sample if hasattr(out, "sample") else out[0]
