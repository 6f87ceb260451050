"""Model families: each one's prompt conditioning and training target agree with the stock diffusers
pipeline and scheduler of its model dir, its data rows carry what it needs, and a method or option it
does not train is refused at config time."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffray.config import apply_overrides
from diffray.errors import ConfigError, ModelError
from diffray.methods import METHODS, validate_config
from diffray.models import build_pipeline_dir
from diffray.models.family import StableDiffusion, StableDiffusionXL, family_of

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return build_pipeline_dir(tmp_path_factory.mktemp("m") / "sd", "tiny-random", seed=0)


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> Path:
    return build_pipeline_dir(tmp_path_factory.mktemp("m") / "xl", "tiny-sdxl", seed=0)


def test_the_family_comes_from_model_index(sd, xl, tmp_path):
    assert isinstance(family_of(str(xl)), StableDiffusionXL) and type(family_of(str(sd))) is StableDiffusion
    with pytest.raises(ModelError, match="org/hub-model: a hub id whose model_index.json is not in the Hugging "
                                         "Face cache and the hub is not reachable"):
        family_of("org/hub-model")  # offline here: its index cannot be read, so its family is not guessed
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelError, match="a KandinskyPipeline model; diffray trains StableDiffusionPipeline, "
                                         "StableDiffusionXLPipeline"):
        family_of(str(tmp_path))


def hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding `model_dir` as the snapshot of `repo_id`'s main branch, the layout
    `hf download` writes (refs/main -> a commit, snapshots/<commit>/...)."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return root


def test_a_hub_ids_family_comes_from_its_cached_model_index_and_it_loads_from_the_cache(xl, tmp_path, monkeypatch):
    """A hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0 on a cluster) is read as what its index
    says, not taken as SD: the index through huggingface_hub (the cache offline, as here), and the model
    then loads by the same id from that cache, in a fresh process as a Ray worker would."""
    import subprocess
    import sys

    import huggingface_hub.constants

    cache = hub_cache(tmp_path / "hub", "org/tiny-sdxl", xl)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert isinstance(family_of("org/tiny-sdxl"), StableDiffusionXL)
    code = ("from diffray.models.family import family_of; from diffray.data.pipeline import model_class; "
            "c = family_of('org/tiny-sdxl').load('org/tiny-sdxl'); "
            "print(type(c.unet).__name__, c.unet.config.addition_embed_type, type(c.text_encoder_2).__name__, "
            "model_class('org/tiny-sdxl'))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_CACHE": str(cache),
                          "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["UNet2DConditionModel", "text_time", "CLIPTextModelWithProjection",
                                   "StableDiffusionXLPipeline"]


def test_tiny_sdxl_is_a_stock_sdxl_dir_that_generates(xl):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl, use_safetensors=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.unet.config.cross_attention_dim == 64
    # as SDXL's: the second tokenizer pads with "!", the first with end-of-text
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # seeded like every builtin: same seed same weights
    again = build_pipeline_dir(xl.parent / "again", "tiny-sdxl", seed=0)
    assert (again / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
           (xl / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_sdxl_conditioning_is_the_stock_pipelines(xl):
    """Both encoders' penultimate states concatenated, the second's pooled projection and the six size
    ids: what `StableDiffusionXLPipeline` feeds its UNet for the same prompts at 64 px."""
    from diffusers import StableDiffusionXLPipeline

    family = family_of(str(xl))
    comps = family.load(str(xl))
    prompts = ["a red circle on a blue background", "x"]
    ids = family.tokenize(comps, prompts)
    assert ids.shape == (2, 2, 77) and not torch.equal(ids[:, 0], ids[:, 1])  # padded differently
    with torch.no_grad():
        got = family.conditioning(comps, ids, {}, (64, 64))
    pipe = StableDiffusionXLPipeline.from_pretrained(xl, use_safetensors=True)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(got["encoder_hidden_states"], embeds, atol=1e-6)
    assert torch.allclose(got["added_cond_kwargs"]["text_embeds"], pooled, atol=1e-6)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(got["added_cond_kwargs"]["time_ids"], time_ids.expand(2, 6))
    # rows that were cropped say so: original (H, W) and crop top-left per row, the target after them
    rows = {"micro_cond": torch.tensor([[60, 100, 0, 21], [64, 64, 0, 0]])}
    assert family.time_ids(rows, (64, 64), pooled).tolist() == [[60, 100, 0, 21, 64, 64], [64, 64, 0, 0, 64, 64]]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("model", ["sd", "xl"])
def test_training_target_matches_the_models_scheduler(model, prediction, request):
    """Noised latents are the shipped scheduler's: DDPM's add_noise for SD; for SDXL, whose dir ships an
    Euler scheduler, the same alphas (Euler's sigma = sqrt((1 - a) / a), and its noisy sample scaled by
    sqrt(a) is DDPM's). Target: the noise for epsilon, the velocity for v-prediction."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    path = str(request.getfixturevalue(model))
    family = family_of(path)
    comps = family.load(path)
    batch = {"sample_id": torch.tensor([3, 4]), "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1}
    n = family.noised(comps, batch, "cpu", torch.float32, step=5, seed=0, noise_offset=0.0)
    a = comps.noise_scheduler.alphas_cumprod[n.timesteps].view(-1, 1, 1, 1)
    if model == "xl":
        euler = EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        assert torch.allclose(euler.alphas_cumprod, comps.noise_scheduler.alphas_cumprod)
        sigma = ((1 - a) / a).sqrt()
        assert torch.allclose(n.noisy / a.sqrt(), n.latents + sigma * n.noise, atol=1e-5)
    else:
        ddpm = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        assert torch.allclose(n.noisy, ddpm.add_noise(n.latents, n.noise, n.timesteps), atol=1e-6)
    target = family.target(comps, n, family.prediction_type(comps, prediction))
    want = n.noise if prediction == "epsilon" else a.sqrt() * n.noise - (1 - a).sqrt() * n.latents
    assert torch.allclose(target, want, atol=1e-5)


def job(method: str, *overrides: str):
    return validate_config(apply_overrides({"method": method}, list(overrides)))


@pytest.mark.parametrize("method", [m for m in METHODS if m not in StableDiffusionXL.methods])
def test_sdxl_refuses_what_it_does_not_train_naming_the_field(xl, method):
    from diffray.methods import load_config, method_of

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{method}.yaml")
    with pytest.raises(ConfigError, match="does not train SDXL models yet") as err:
        method_of(method).check(cfg, str(xl))
    assert "method" in str(err.value)


@pytest.mark.parametrize("method, override, field", [
    ("full", "full.train_text_encoder=true", "full.train_text_encoder"),
    ("dreambooth", "dreambooth.mode=full", "dreambooth.train_text_encoder"),
    ("lora", "data.shuffle_tags=true", "data.shuffle_tags"),
    ("lora", "export.formats=[kohya]", "export.formats"),
    ("lora", "lora.init_from=/some/lora.safetensors", "lora.init_from")])
def test_sdxl_refuses_options_it_does_not_support(xl, sd, tmp_path, method, override, field):
    from diffray.methods import method_of

    overrides = [override, "data.path=unused"]
    if method == "dreambooth":
        overrides += ["dreambooth.train_text_encoder=true", "dreambooth.instance_prompt=a sks dog"]
    cfg = job(method, *overrides)
    with pytest.raises(ConfigError) as err:
        method_of(method).family_check(cfg, str(xl))
    assert field in str(err.value)
    method_of(method).family_check(cfg, str(sd))  # SD trains every option
    method_of("lora").family_check(job("lora", "lora.train_text_encoder=true"), str(xl))  # both encoders' LoRA


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_sdxl_rows_carry_both_tokenizers_ids_and_each_images_size_and_crop(xl, sd):
    """The data pipeline's rows for an SDXL dir: ids [B, 2, 77] (each tokenizer's) and `micro_cond` =
    (original H, W, crop top, crop left), the left measured in the flipped image when the row flipped."""
    from diffray.data.pipeline import preprocess_batch
    from diffray.data.transforms import resize_crop
    from diffray.data.validate import Rules

    batch = {"sample_id": np.array([0, 1, 2]), "source": np.array(["a.png", "b.png", "c.png"]),
             "image": np.array([png(100, 60), png(64, 64), png(50, 90)], dtype=object),
             "caption": np.array(["a red circle", "x", "a blue square"])}
    out = preprocess_batch(batch, str(xl), 64, center_crop=True, random_flip=False, seed=0, rules=Rules())
    family = family_of(str(xl))
    comps = family.load(str(xl))
    assert np.array_equal(out["input_ids"], family.tokenize(comps, list(batch["caption"])).numpy())
    # 100x60 covers 64 as 107x64, centre crop left (107 - 64) // 2 = 21; 50x90 as 64x115, top 25
    assert out["micro_cond"].tolist() == [[60, 100, 0, 21], [64, 64, 0, 0], [90, 50, 25, 0]]
    assert out["input_ids"].shape == (3, 2, 77) and "micro_cond" not in preprocess_batch(
        batch, str(sd), 64, center_crop=True, random_flip=False, seed=0, rules=Rules())
    # random crops: the same rng draws with and without the flip; a flipped row's left is 43 - the plain one
    img, flips = Image.new("RGB", (100, 60)), 0
    for seed in range(16):
        plain: list = []
        flipped: list = []
        resize_crop(img, 64, False, False, np.random.default_rng(seed), plain)
        rng = np.random.default_rng(seed)
        resize_crop(img, 64, False, True, rng, flipped)
        rng_again = np.random.default_rng(seed)
        rng_again.integers(0, 44), rng_again.integers(0, 1)
        was_flipped = rng_again.random() < 0.5
        flips += was_flipped
        assert plain[0][:3] == flipped[0][:3] == (60, 100, 0)
        assert flipped[0][3] == (43 - plain[0][3] if was_flipped else plain[0][3])
    assert 0 < flips < 16


def test_sdxl_size_ids_under_aspect_buckets_are_each_rows_original_size_its_bucket_crop_and_the_bucket(xl):
    """With `data.aspect_buckets`, an SDXL row's size ids are its original (H, W), the corner of the crop to
    its bucket, and the bucket's (H, W) as the target: what the denoiser reads from a one-shape batch."""
    from diffray.data.pipeline import preprocess_batch
    from diffray.data.transforms import aspect_buckets
    from diffray.data.validate import Rules

    batch = {"sample_id": np.array([0, 1, 2]), "source": np.array(["wide.png", "tall.png", "square.png"]),
             "image": np.array([png(120, 70), png(70, 120), png(90, 90)], dtype=object),
             "caption": np.array(["a red circle", "x", "a blue square"])}
    out = preprocess_batch(batch, str(xl), 64, center_crop=True, random_flip=False, seed=0, rules=Rules(),
                           buckets=aspect_buckets(64, 16, 2.0))  # (48, 80), (64, 64), (80, 48) as (W, H)
    assert [px.shape[1:] for px in out["pixel_values"]] == [(48, 80), (80, 48), (64, 64)]
    # 120x70 covers the 80x48 bucket as 82x48: centre crop left 1; 70x120 as 48x82: top 1
    assert out["micro_cond"].tolist() == [[70, 120, 0, 1], [120, 70, 1, 0], [90, 90, 0, 0]]
    for i, px in enumerate(out["pixel_values"]):  # each row trains in a batch of its own shape
        ids = StableDiffusionXL.time_ids({"micro_cond": out["micro_cond"][[i]]}, px.shape[1:], torch.zeros(1))
        assert ids.tolist() == [[*out["micro_cond"][i], *px.shape[1:]]]


def test_textual_inversion_files_load_only_into_a_model_with_their_number_of_encoders(sd, xl, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffray.errors import AdapterError
    from diffray.models.textual_inversion import (add_placeholder_tokens, export_textual_inversion,
                                                  load_textual_inversion)
    from testkit.adapters import random_textual_inversion

    one = random_textual_inversion(str(sd), tmp_path / "one", "<x>", seed=1)
    comps = family_of(str(xl)).load(str(xl))
    ids = [add_placeholder_tokens(t, e, "<x>", "o", 1) for t, e in ((comps.tokenizer, comps.text_encoder),
                                                                    (comps.tokenizer_2, comps.text_encoder_2))]
    two = export_textual_inversion(tmp_path / "two", comps.text_encoder, ids[0], "<x>", {"placeholder_token": "<x>"},
                                   comps.text_encoder_2, ids[1])
    xl_pipe = StableDiffusionXLPipeline.from_pretrained(xl, use_safetensors=True)
    sd_pipe = StableDiffusionPipeline.from_pretrained(sd, use_safetensors=True, safety_checker=None)
    with pytest.raises(AdapterError, match=r"an embedding for one text encoder\(s\) \(\['<x>'\]\), this model has two"):
        load_textual_inversion(xl_pipe, one)
    with pytest.raises(AdapterError, match=r"an embedding for two text encoder\(s\) .*this model has one"):
        load_textual_inversion(sd_pipe, two)
    load_textual_inversion(xl_pipe, two)
    for tok, enc in ((xl_pipe.tokenizer, xl_pipe.text_encoder), (xl_pipe.tokenizer_2, xl_pipe.text_encoder_2)):
        assert "<x>" in tok.get_vocab() and enc.get_input_embeddings().weight.shape[0] == len(tok)


@pytest.mark.parametrize("text, why", [("{", "not valid JSON"), ("[1, 2]", "must be a JSON object, got list"),
                                       (b"\xff\xfe{", "not valid JSON")])
def test_a_broken_model_index_names_the_file(tmp_path, text, why):
    from diffray.errors import ModelError
    from diffray.models.family import family_of

    index = tmp_path / "model_index.json"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelError, match=f"^{index}: {why}"):
        family_of(str(tmp_path))
