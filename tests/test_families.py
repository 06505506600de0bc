"""The generator families (unet, dit, text2image): fine-tune from a local diffusers directory
as a user does (`synthaug tiny-base`, then `synthaug finetune --config
jobs/configs/finetune_tiny_<family>.yaml`, 2 Ray Train workers), reload the export, sample;
and bad input.

The bases are tiny random-weight models built from configs (:mod:`synthaug.generative.tiny`)
and saved with ``save_pretrained``, in the layout a downloaded checkpoint has; nothing is
downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from synthaug import cli
from synthaug.artifacts import DatasetError, read_manifest
from synthaug.config import ConfigError, load_config
from synthaug.generative import finetune, models
from synthaug.generative.diffusion import diffusion_loss, sample_images
from synthaug.generative.tiny import TINY_FAMILIES as FAMILIES, save_tiny_dit

CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
TINY = ["finetune.steps=4", "finetune.batch_size=8", "finetune.checkpoint_every=4", "finetune.num_workers=2",
        "finetune.warmup_steps=1"]


# ----------------------------------------------------------------------------- tiny bases


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each family's tiny base, made as a user makes one: `synthaug tiny-base --family F --out DIR`."""
    root = tmp_path_factory.mktemp("bases")
    for family in FAMILIES:
        assert cli.main(["tiny-base", "--family", family, "--out", str(root / family)]) == 0
    assert cli.main(["tiny-base", "--family", "dit", "--out", str(root / "dit")]) == 2  # never overwritten
    return {family: root / family for family in FAMILIES}


# ----------------------------------------------------------------------------- the cores, without Ray


@pytest.mark.parametrize("family", ["dit", "text2image"])
def test_latent_cores(bases, family):
    names = ["zero", "one", "two"]
    gen = models.load_generator(bases[family], family, names, image_size=8, channels=1)
    assert gen.latent_shape == (4, 4, 4) and gen.null_class == 3
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert gen.encode(x).shape == (2, 4, 4, 4) and gen.decode(gen.encode(x)).shape == (2, 1, 8, 8)
    from diffusers import DDPMScheduler

    loss = diffusion_loss(gen, x, torch.tensor([0, 3]), DDPMScheduler.from_config(gen.scheduler_config))
    loss.backward()
    assert torch.isfinite(loss)
    imgs = sample_images(gen, [0, 1, 2], [1, 2, 3], guidance_scale=2.0, steps=2)
    assert imgs.shape == (3, 1, 8, 8) and torch.isfinite(imgs).all()
    # Per-sample seeds hold through the VAE decode: an image does not depend on its batch.
    parts = torch.cat([sample_images(gen, [0], [1], guidance_scale=2.0, steps=2),
                       sample_images(gen, [1, 2], [2, 3], guidance_scale=2.0, steps=2)])
    assert torch.allclose(imgs, parts, atol=1e-4)
    if family == "dit":
        tables = [b.norm1.emb.class_embedder for b in gen.model.transformer_blocks]
        assert all(e.embedding_table.num_embeddings == 4 and e.num_classes == 3 and e.dropout_prob == 0 for e in tables)
    else:
        assert gen.model.prompt_embeds.shape == (4, 16, 32)
        assert gen.meta["prompts"] == ["a photo of a zero", "a photo of a one", "a photo of a two", ""]
        assert not any(p.requires_grad for p in gen.components["text_encoder"].parameters())
        assert not any(p.requires_grad for p in gen.components["vae"].parameters())


def test_lora_trains_adapters_only_and_folds_them_on_export(bases, tmp_path):
    torch.manual_seed(0)  # the adapter values below; unseeded, the fold's float error varied run to run
    gen = models.load_generator(bases["text2image"], "text2image", ["a", "b"], image_size=8, channels=1, lora_rank=2)
    trained = [n for n, p in gen.model.named_parameters() if p.requires_grad]
    assert trained and all("lora" in n for n in trained)
    with torch.no_grad():  # make the adapters matter (lora_B starts at zero)
        for n, p in gen.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.tensor([0, 2])
    with torch.no_grad():
        before = gen.denoise(x, t, y)
    m = models.save_generator(gen, tmp_path / "g", {})
    assert m["lora_rank"] == 2 and m["prompt_template"] == "a photo of a {class_name}"
    again = models.load_generator(tmp_path / "g", require_manifest=True)
    assert not any("lora" in k for k in again.model.state_dict())
    with torch.no_grad():
        assert torch.allclose(again.denoise(x, t, y), before, atol=1e-4)  # fp32 fold error is ~1e-5 here


# ----------------------------------------------------------------------------- through Ray Train


@pytest.fixture(scope="module")
def finetuned(ray_session, digits_dirs, bases, tmp_path_factory):
    """Each family fine-tuned from its tiny base through the console entry:
    ``synthaug finetune --config jobs/configs/finetune_tiny_<family>.yaml --data DIR``
    with the base, work dir (and LoRA) given as dotted overrides. dit and the text2image LoRA run on
    the configs' 2 DDP workers; unet and full text2image on one (a Ray task: unet's DDP run is
    test_generative's fine-tune, text2image's the LoRA one here)."""
    root = tmp_path_factory.mktemp("ft")
    out = {}
    for name, family, over in [("unet", "unet", ["finetune.num_workers=1"]), ("dit", "dit", []),
                               ("text2image", "text2image", ["finetune.num_workers=1"]),
                               ("lora", "text2image", ["finetune.lora_rank=2"])]:
        config = CONFIGS / f"finetune_tiny_{family}.yaml"
        argv = ["finetune", "--config", str(config), "--data", str(digits_dirs["train"]),
                f"work_dir={root / name}", f"finetune.base={bases[family]}", *over]
        assert cli.main(argv) == 0
        export = root / name / load_config(config).name / "generators" / "finetune"  # the run layout's place
        out[name] = (export, read_manifest(export))
    return out


@pytest.mark.parametrize("family,parts", [("unet", ["unet", "scheduler"]), ("dit", ["transformer", "vae", "scheduler"]),
                                          ("text2image", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])])
def test_finetuned_export_reloads_and_samples(finetuned, bases, family, parts):
    from synthaug.generative.sample import Sampler

    out, m = finetuned[family]
    assert m["family"] == family and m["steps"] == 4 and m["class_names"] == [str(i) for i in range(10)]
    assert m["null_class"] == 10 and m["image_size"] == 8 and m["channels"] == 1
    assert m["base_hash"] and m["base"] == str(bases[family])
    for part in parts:
        assert (out / part).is_dir() and not list((out / part).glob("*.bin")), part
    assert list((out / parts[0]).glob("*.safetensors")) and (out / "manifest.json").is_file()
    assert m["config"]["finetune"]["num_workers"] == (2 if family == "dit" else 1) and m["config"]["finetune"]["family"] == family
    if family == "text2image":  # the template from the YAML
        assert m["prompts"][3] == "a photo of the handwritten digit 3" and m["prompts"][-1] == ""
    elif family == "dit":
        # Label tables padded on disk so that DiTPipeline's null class 1000 is ours (tests/test_diffusers_pipelines.py).
        assert json.loads((out / "transformer" / "config.json").read_text())["num_embeds_ada_norm"] == 1000
        assert json.loads((out / "model_index.json").read_text())["id2label"]["9"] == "9"
    else:
        assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 11

    gen = models.load_generator(out, require_manifest=True)
    x = sample_images(gen, [0, 9, 10], [1, 2, 3], guidance_scale=2.0, sampler="ddpm", steps=3)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    # The Ray Data sampler class takes the export as it takes a unet one.
    rows = Sampler(str(out), {"steps": 2, "guidance_scale": 1.5})(
        {"id": ["a", "b"], "label": [1, 2], "class_name": ["1", "2"], "seed": [5, 6]})
    assert rows.num_rows == 2 and rows.column("generator")[0].as_py() == m["weights_hash"][:16]


def test_lora_finetune_changes_only_attention_projections(finetuned, bases):
    from safetensors.torch import load_file

    out, m = finetuned["lora"]
    assert m["lora_rank"] == 2 and m["steps"] == 4
    base = load_file(bases["text2image"] / "unet" / "diffusion_pytorch_model.safetensors")
    got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(got) == set(base)  # a plain UNet: the adapters are folded in
    # Its checkpoints keep only what was trained (the adapters); the frozen base comes from the base dir.
    ckpts = sorted(out.parents[2].rglob("checkpoint_*/model.safetensors"))
    assert ckpts and all(set(load_file(c)) and all("lora" in k for k in load_file(c)) for c in ckpts)
    changed = {k for k in base if not torch.equal(base[k], got[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") and "attn" in k for k in changed)
    gen = models.load_generator(out, require_manifest=True)
    assert torch.isfinite(sample_images(gen, [0, 10], [1, 2], guidance_scale=3.0, steps=2)).all()


# ----------------------------------------------------------------------------- bad input


def _raises(exc, match, cfg_over, data, base, tmp_path):
    cfg = load_config(None, TINY + cfg_over)
    with pytest.raises(exc, match=match):
        finetune.run(cfg, "finetune", data, tmp_path / "out", tmp_path / "ray", base_dir=base)
    assert not (tmp_path / "out").exists()


def test_bad_base_directories(bases, digits_dirs, tmp_path):
    train = digits_dirs["train"]
    _raises(models.GeneratorError, "does not exist", ["finetune.family=dit"], train, tmp_path / "missing", tmp_path)
    cases = [("dit", "vae", "incomplete generator, no vae/config.json"),
             ("dit", "scheduler", "incomplete generator, no scheduler/scheduler_config.json"),
             ("text2image", "tokenizer", "incomplete generator, no tokenizer/tokenizer.json"),
             ("text2image", "text_encoder/model.safetensors", "incomplete generator, no weights file")]
    for family, remove, msg in cases:
        broken = tmp_path / f"broken-{family}-{remove.replace('/', '-')}"
        shutil.copytree(bases[family], broken)
        (shutil.rmtree if (broken / remove).is_dir() else lambda p: p.unlink())(broken / remove)
        _raises(models.GeneratorError, msg, [f"finetune.family={family}"], train, broken, tmp_path)
    for family, base, msg in [("unet", "dit", "family/model mismatch: it holds a DiTTransformer2DModel"),
                              ("dit", "text2image", "a 'text2image' model, but the config says family 'dit'"),
                              ("unet", "text2image", "names a 'UNet2DConditionModel' \\(that is family 'text2image'\\)"),
                              ("text2image", "dit", "family/model mismatch")]:
        _raises(models.GeneratorError, msg, [f"finetune.family={family}"], train, bases[base], tmp_path)


def test_hub_ids_need_allow_downloads(bases, digits_dirs, tmp_path, monkeypatch):
    _raises(models.GeneratorError, "'facebook/DiT-XL-2-256' does not exist locally and looks like a Hugging Face hub id",
            ["finetune.family=dit"], digits_dirs["train"], "facebook/DiT-XL-2-256", tmp_path)
    # With allow_downloads the id is fetched (here: a stand-in for the hub) and checked like a local base.
    import huggingface_hub

    asked = {}

    def fake_download(repo_id, allow_patterns, ignore_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(bases["dit"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert models.resolve_base("facebook/DiT-XL-2-256", "dit", allow_downloads=True) == str(bases["dit"])
    assert asked["repo_id"] == "facebook/DiT-XL-2-256" and "transformer/*" in asked["allow_patterns"]


def test_bad_sizes_classes_and_settings(bases, digits_dirs, tmp_path):
    train = digits_dirs["train"]
    # VAE factor 4 x patch 4 = 16 does not divide 8px digits.
    coarse = save_tiny_dit(tmp_path / "coarse", patch_size=4, vae_blocks=(8, 16, 16))
    _raises(models.GeneratorError, "image size 8 is incompatible with the model.*divisible by 16 \\(VAE factor 4 x patch size 4\\)",
            ["finetune.family=dit"], train, coarse, tmp_path)
    # A dataset without classes.
    empty = tmp_path / "empty"
    shutil.copytree(train, empty)
    m = read_manifest(empty)
    (empty / "manifest.json").write_text(json.dumps({**m, "class_names": []}))
    _raises(DatasetError, "class count of 0", ["finetune.family=dit"], empty, bases["dit"], tmp_path)
    with pytest.raises(models.GeneratorError, match="class count of 0"):
        models.load_generator(bases["dit"], "dit", [])
    # Prompt templates must name the class; LoRA is for text2image; a base fixes the prediction type.
    with pytest.raises(ConfigError, match="finetune.prompt_template.*has no '\\{class_name\\}'"):
        load_config(None, ["finetune.family=text2image", "finetune.prompt_template=a photo of a digit"])
    with pytest.raises(ConfigError, match="cannot be filled"):
        load_config(None, ["finetune.prompt_template='{class_name} in {place}'"])
    with pytest.raises(models.GeneratorError, match="has no '\\{class_name\\}'"):
        models.load_generator(bases["text2image"], "text2image", ["a"], prompt_template="a photo")
    with pytest.raises(ConfigError, match="LoRA is implemented for family 'text2image' only"):
        load_config(None, ["finetune.family=dit", "finetune.lora_rank=4"])
    _raises(models.GeneratorError, "the base predicts 'epsilon' but config key 'finetune.prediction_type' is 'v_prediction'",
            ["finetune.family=dit", "finetune.prediction_type=v_prediction"], train, bases["dit"], tmp_path)
    with pytest.raises(models.GeneratorError, match="fine-tuned from a pretrained model only"):
        models.new_generator("dit", "tiny", ["a"], 8, 1)
