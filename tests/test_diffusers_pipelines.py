"""Generator exports in diffusers: ``DiTPipeline`` / ``StableDiffusionPipeline.from_pretrained(export)``
load the ``dit`` / ``text2image`` exports, and the ``unet`` export runs in a hand-written
class-conditional loop (the lines docs/families.md shows); each sample equals synthaug's own.

The generators are tiny random-weight ones from :mod:`synthaug.generative.tiny`'s bases, saved
with ``save_generator`` as a fine-tune exports them (no training). They run on 8 px RGB
images (``channels=3``), so the pipelines' RGB output is synthaug's without the grayscale
average. What the comparisons hold equal, and why:

* Scheduler: an export's ``scheduler/`` is the training schedule (``DDPMScheduler``); both
  sides step with the DDIM that synthaug's ``sampler: ddim`` builds from that config
  (``make_scheduler``), the pipeline's from the export's own ``scheduler_config.json``.
* Initial noise: one seeded generator per sample on both sides (``DiTPipeline`` has no
  ``latents=``, but its ``randn_tensor`` draws sample i from ``generator[i]`` exactly as
  ``per_sample_noise`` does); ``StableDiffusionPipeline`` gets the same noise as ``latents=``.
* Guidance: both compute ``uncond + w (cond - uncond)`` (DiT on the eps half; its learned
  variance half is dropped by both); the null class is the empty prompt in both, and for
  DiT the pipeline's hard-coded class 1000, which the export's padded label tables make
  synthaug's null row.
* Output: the pipelines return ``(x / 2 + 0.5).clamp(0, 1)`` of the VAE decode, synthaug
  ``x.clamp(-1, 1)``; the same numbers up to float rounding (DiT's pipeline also multiplies
  by ``1 / scaling_factor`` where synthaug divides).

Every class row and prompt differs, and two classes at one seed give different images, so a
wrong ``id2label``, null row, prompt or component fails the comparison.
"""

from __future__ import annotations

import json

import pytest
import torch

from synthaug.generative import models
from synthaug.generative.diffusion import make_scheduler, per_sample_noise, sample_images
from synthaug.generative.tiny import save_tiny_dit, save_tiny_text2image

NAMES = ["zero", "one", "two"]
STEPS, W, SEEDS = 3, 3.0, [5, 5, 6]  # seed 5 twice: two classes from the same noise must differ
LABELS = [2, 0, 1]
TOL = 1e-5


def _pixels01(gen) -> torch.Tensor:
    """synthaug's samples of LABELS x SEEDS, as a pipeline returns them: (B, 3, 8, 8) in [0, 1]."""
    return sample_images(gen, LABELS, SEEDS, guidance_scale=W, sampler="ddim", steps=STEPS) / 2 + 0.5


def _check_sensitive(images: torch.Tensor) -> None:
    assert (images[0] - images[1]).abs().max() > 1e-3  # class 2 vs class 0 at seed 5


def _tables(model) -> list[torch.Tensor]:
    return [b.norm1.emb.class_embedder.embedding_table.weight.detach().clone() for b in model.transformer_blocks]


def test_dit_export_loads_in_dit_pipeline(tmp_path):
    from diffusers import DDPMScheduler, DiTPipeline

    # A base as downloaded from the hub, with a model_index.json of its own (ImageNet labels,
    # another scheduler): the checks take it, and the export's model_index.json is written anew.
    base = save_tiny_dit(tmp_path / "base")
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.12.0", "id2label": {"0": "tench, Tinca tinca"},
        "scheduler": ["diffusers", "KarrasDiffusionSchedulers"], "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    assert models.resolve_base(base, "dit") == str(base)
    gen = models.load_generator(base, "dit", NAMES, image_size=8, channels=3)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # every class row, and the null row, its own
        torch.manual_seed(1)
        for b in gen.model.transformer_blocks:
            b.norm1.emb.class_embedder.embedding_table.weight.normal_()
    trained = _tables(gen.model)

    export = tmp_path / "export"
    models.save_generator(gen, export, {"steps": 0})
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"] == {"0": "zero", "1": "one", "2": "two"}
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"] and index["transformer"][1] == "DiTTransformer2DModel"
    assert all(torch.equal(a, b) for a, b in zip(_tables(gen.model), trained))  # the export left the model alone
    assert models.resolve_base(export, "dit") == str(export)

    # synthaug reloads its export with the padding taken off; a fine-tune to other classes starts from its null row.
    again = models.load_generator(export, require_manifest=True)
    assert all(torch.equal(a, b) for a, b in zip(_tables(again.model), trained))
    other = models.load_generator(export, "dit", ["a", "b"])
    assert all(torch.equal(t, w[3].expand(3, -1)) for t, w in zip(_tables(other.model), trained))

    # The pipeline: label ids from the export's class names; tables padded so that its null class 1000 is ours.
    pipe = DiTPipeline.from_pretrained(str(export))
    assert isinstance(pipe.scheduler, DDPMScheduler)
    ids = pipe.get_label_ids([NAMES[i] for i in LABELS])
    assert ids == LABELS
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape[0] == 1001 and torch.equal(table[1000], trained[0][3]) and torch.equal(table[:3], trained[0][:3])

    pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
    noise = [torch.Generator().manual_seed(s) for s in SEEDS]
    images = pipe(class_labels=ids, guidance_scale=W, num_inference_steps=STEPS, generator=noise, output_type="pt").images
    ours = _pixels01(again)
    _check_sensitive(ours)
    assert images.shape == (3, 3, 8, 8)
    assert torch.allclose(images, ours, atol=TOL), (images - ours).abs().max()
    assert torch.allclose(_pixels01(gen), ours, atol=TOL)  # and the model before export samples the same


def test_text2image_export_loads_in_stable_diffusion_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = save_tiny_text2image(tmp_path / "base")
    gen = models.load_generator(base, "text2image", NAMES, image_size=8, channels=3,
                                prompt_template="a handwritten {class_name}")
    export = tmp_path / "export"
    manifest = models.save_generator(gen, export, {"steps": 0})
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"][1] == "CLIPTokenizer"

    # The prompt of a class, as a user builds it from the manifest (the null class is the empty prompt).
    assert manifest["prompt_template"] == "a handwritten {class_name}"
    prompts = [manifest["prompt_template"].format(class_name=manifest["class_names"][k]) for k in LABELS]
    assert prompts == [manifest["prompts"][k] for k in LABELS] == ["a handwritten two", "a handwritten zero",
                                                                     "a handwritten one"]

    pipe = StableDiffusionPipeline.from_pretrained(str(export))
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
    again = models.load_generator(export, require_manifest=True)
    latents, _ = per_sample_noise(SEEDS, again.latent_shape)  # (B, 4, 4, 4)
    images = pipe(prompts, height=8, width=8, guidance_scale=W, num_inference_steps=STEPS, latents=latents,
                  output_type="pt").images
    ours = _pixels01(again)
    _check_sensitive(ours)
    assert images.shape == (3, 3, 8, 8)
    assert torch.allclose(images, ours, atol=TOL), (images - ours).abs().max()


def test_unet_export_in_a_class_conditional_loop(tmp_path):
    """The lines docs/families.md shows for the unet family (no diffusers pipeline takes class labels)."""
    from diffusers import DDIMScheduler, UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gen = models.new_generator("unet", "tiny", NAMES, 8, 3)
    export = tmp_path / "export"
    models.save_generator(gen, export, {"steps": 0})
    assert not (export / "model_index.json").exists()

    # As in the docs: the UNet, synthaug's DDIM on the export's schedule, the null class = the class count.
    unet = UNet2DModel.from_pretrained(export, subfolder="unet")
    scheduler = DDIMScheduler.from_pretrained(export, subfolder="scheduler", timestep_spacing="trailing",
                                              set_alpha_to_one=False)
    names = json.loads((export / "manifest.json").read_text())["class_names"]
    y = torch.tensor([names.index(NAMES[k]) for k in LABELS])
    null = torch.full_like(y, len(names))
    x, _ = per_sample_noise(SEEDS, (3, 8, 8))
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, null])).sample.chunk(2)
            x = scheduler.step(uncond + W * (cond - uncond), t, x).prev_sample
    images = x.clamp(-1, 1) / 2 + 0.5

    ours = _pixels01(models.load_generator(export, require_manifest=True))
    _check_sensitive(ours)
    assert torch.allclose(images, ours, atol=TOL), (images - ours).abs().max()
