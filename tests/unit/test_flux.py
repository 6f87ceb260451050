"""The Flux family against stock diffusers: `builtin:tiny-flux` is a `FluxPipeline` dir that draws, its
T5 tokenizer is ours, the prompt conditioning is `FluxPipeline.encode_prompt`'s, the latents are packed
and positioned as `FluxPipeline` packs them, the noised latents and flow target are the shipped
scheduler's (`scale_noise`) and diffusers' Flux training recipe's, data rows carry CLIP's and T5's ids, and
what Flux does not train is refused at config time, naming the field."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffray.config import apply_overrides
from diffray.errors import ConfigError
from diffray.methods import METHODS, validate_config
from diffray.models import build_pipeline_dir
from diffray.models.family import family_of
from diffray.models.flux import Flux, image_ids, pack, unpack

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPTS = ["a red circle on a blue background", "x"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    return build_pipeline_dir(tmp_path_factory.mktemp("m") / "flux", "tiny-flux", seed=0)


@pytest.fixture(scope="module")
def pipe(flux):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(str(flux), use_safetensors=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_tiny_flux_is_a_stock_flux_dir_that_draws_with_our_t5_tokenizer(flux, pipe):
    assert isinstance(family_of(str(flux)), Flux)
    assert type(pipe.tokenizer_2).__name__.startswith("T5Tokenizer") and pipe.tokenizer_2.model_max_length == 32
    ids = pipe.tokenizer_2(["A red circle"]).input_ids[0]
    assert ids[-1] == pipe.tokenizer_2.eos_token_id and pipe.tokenizer_2.decode(ids[:-1]) == "A red circle"
    img = pipe(PROMPTS[0], height=64, width=64, num_inference_steps=3, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all() and img.std() > 0


def test_flux_conditioning_and_packing_are_the_stock_pipelines(flux, pipe):
    from diffusers import FluxPipeline

    family = Flux()
    comps = family.load(str(flux))
    ids = family.tokenize(comps, PROMPTS)
    assert ids.shape == (2, 77 + 32)
    with torch.no_grad():
        ours = family.conditioning(comps, ids, {}, (64, 64))
        states, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=32)
    torch.testing.assert_close(ours["encoder_hidden_states"], states, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["added_cond_kwargs"]["pooled_projections"], pooled, atol=1e-6, rtol=0)
    assert not text_ids.any()

    latents = torch.randn(2, 4, 8, 6)
    stock = FluxPipeline._pack_latents(latents, 2, 4, 8, 6)
    assert torch.equal(pack(latents), stock) and torch.equal(unpack(stock, 8, 6), latents)
    assert torch.equal(image_ids(8, 6, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_flux_forward_is_the_stock_pipelines_transformer_call(flux, pipe):
    """Our prediction for latents [B, C, H, W] at sigma * 1000 is `FluxPipeline`'s call: packed latents,
    timestep / 1000, zero text ids, its image ids, the guidance value (tiny-flux embeds it, as
    FLUX.1-dev), unpacked back."""
    from diffusers import FluxPipeline

    from diffray.models.flux import flux_forward

    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0, 600.0])
    with torch.no_grad():
        states, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=32)
        ours = flux_forward(pipe.transformer, latents, t, states, pooled, guidance=3.5)
        other_guidance = flux_forward(pipe.transformer, latents, t, states, pooled, guidance=1.0)
        out = pipe.transformer(hidden_states=FluxPipeline._pack_latents(latents, 2, 4, 8, 8), timestep=t / 1000,
                               guidance=torch.full((2,), 3.5), pooled_projections=pooled, encoder_hidden_states=states,
                               txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu",
                                                                                                torch.float32)).sample
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(out, 64, 64, 8), atol=1e-6, rtol=0)
    assert pipe.transformer.config.guidance_embeds and (other_guidance - ours).abs().max() > 1e-4


def test_flux_noise_and_target_follow_the_scheduler_and_the_flow_matching_recipe(flux):
    """noisy = scheduler.scale_noise(latents, sigma * 1000, noise); target = noise - latents; latents are the
    VAE's shifted and scaled; the same rows give the same draws in any batch."""
    family = Flux()
    comps = family.load(str(flux))
    vae = comps.vae
    assert vae.config.shift_factor == 0.1 and vae.config.scaling_factor == 0.5
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    batch = {"sample_id": torch.tensor([4, 9, 11]), "pixel_values": pixels}
    n = family.noised(comps, batch, "cpu", torch.float32, step=3, seed=0, noise_offset=0.0)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    # the posterior draw is keyed; its mean part shows the shift: (mean - shift) * scale
    assert (n.latents - (dist.mean - 0.1) * 0.5).abs().mean() < (n.latents - dist.mean * 0.5).abs().mean()
    sigmas = n.timesteps / 1000
    assert ((sigmas > 0) & (sigmas <= 1)).all() and len(set(sigmas.tolist())) == 3
    for i in range(3):
        stock = comps.noise_scheduler.scale_noise(n.latents[i:i + 1], n.timesteps[i:i + 1], n.noise[i:i + 1])
        torch.testing.assert_close(n.noisy[i:i + 1], stock, atol=1e-6, rtol=0)
    torch.testing.assert_close(family.target(comps, n, "flow_match"), n.noise - n.latents)
    again = family.noised(comps, {k: v[[2, 0]] for k, v in batch.items()}, "cpu", torch.float32, 3, 0, 0.0)
    torch.testing.assert_close(again.noisy, n.noisy[[2, 0]], atol=1e-5, rtol=0)


def test_flux_rows_carry_clip_then_t5_ids(flux):
    from diffray.data.pipeline import preprocess_batch
    from diffray.data.validate import Rules

    from test_families import png

    batch = {"sample_id": np.array([0, 1]), "source": np.array(["a.png", "b.png"]),
             "image": np.array([png(64, 64), png(80, 64)], dtype=object), "caption": np.array(PROMPTS)}
    out = preprocess_batch(batch, str(flux), 64, center_crop=True, random_flip=False, seed=0, rules=Rules())
    family = Flux()
    assert np.array_equal(out["input_ids"], family.tokenize(family.load(str(flux)), PROMPTS).numpy())
    assert out["input_ids"].shape == (2, 109) and "micro_cond" not in out


def job(method: str, *overrides: str):
    return validate_config(apply_overrides({"method": method}, ["data.path=unused", *overrides]))


@pytest.mark.parametrize("method", [m for m in METHODS if m not in Flux.methods])
def test_flux_refuses_methods_it_does_not_train(flux, method):
    from diffray.methods import load_config, method_of

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{method}.yaml")
    with pytest.raises(ConfigError, match="does not train Flux models yet") as err:
        method_of(method).check(cfg, str(flux))
    assert "method" in str(err.value)


@pytest.mark.parametrize("override, field", [
    ("lora.train_text_encoder=true", "lora.train_text_encoder"),
    ("lora.init_from=/some/lora.safetensors", "lora.init_from"),
    ("export.formats=[kohya]", "export.formats"),
    ("data.shuffle_tags=true", "data.shuffle_tags"),
    ("train.snr_gamma=5", "train.snr_gamma"),
    ("model.prediction_type=epsilon", "model.prediction_type"),
    ("data.aspect_buckets=true", "data.aspect_buckets"),
    ("train.attention=eager", "train.attention"),
    ("lora.variant=loha", "lora.variant")])
def test_flux_refuses_options_it_does_not_support_naming_the_field(flux, override, field):
    from diffray.methods import method_of

    method_of("lora").family_check(job("lora"), str(flux))  # the plain LoRA job passes
    with pytest.raises(ConfigError) as err:
        method_of("lora").family_check(job("lora", override), str(flux))
    assert field in str(err.value)


def test_flux_cached_rows_train_the_uncached_losses_without_encoder_calls(flux):
    """The latent cache's rows of a Flux model (the VAE posterior, T5's states, CLIP's pooled output, made
    by the cache's encoder actor) give the LoRA task the losses it computes from images and token ids, with
    caption dropout on (dropped rows read the empty caption's cached states), and no VAE or encoder call."""
    from diffray.data.cache import Encoder
    from diffray.methods import method_of
    from diffray.trainers.components.diffusion import caption_dropout_mask
    from diffray.trainers.session import WorkerEnv

    cfg = job("lora", f"model.path={flux}", "data.cache=auto", "data.caption_dropout=0.5", "lora.rank=4")
    method_of("lora").family_check(cfg, str(flux))  # the cache is taken on Flux
    task = method_of("lora").task()(cfg, str(flux), WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    torch.manual_seed(0)
    for name, param in task.module.named_parameters():  # a LoRA away from its zero init: it reads the text
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    captions = ["a red circle", "a blue square on green", "x", "two yellow stars"]
    rows = {"sample_id": np.arange(4), "pixel_values": np.random.default_rng(0).uniform(-1, 1, (4, 3, 64, 64))
            .astype(np.float32), "input_ids": task.family.tokenize(task.comps, captions).numpy()}
    encoder = Encoder(str(flux), use_gpu=False)
    assert encoder.comps.unet is None  # the cache's actors never hold the transformer
    cached = encoder(rows)
    assert cached["prompt_embeds"].shape == (4, Flux.t5_length(task.comps), task.comps.text_encoder_2.config.d_model)

    def as_torch(batch):
        return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}

    step = next(s for s in range(1, 50)  # a step that drops some captions and keeps others
                if 0 < int(caption_dropout_mask(list(range(4)), s, cfg.run.seed, 0.5).sum()) < 4)
    task.counters.take()
    with torch.no_grad():
        live = task.losses(task.module, as_torch(rows), step)
        live_calls = task.counters.take()
        from_cache = task.losses(task.module, as_torch({k: v for k, v in cached.items() if k != "pixel_values"}), step)
        cache_calls = task.counters.take()
    torch.testing.assert_close(from_cache, live, rtol=1e-4, atol=1e-5)
    assert all(live_calls.values()) and not any(cache_calls.values()), (live_calls, cache_calls)
    with torch.no_grad():  # the cached states are what the loss reads: other rows' states give other losses
        swapped = {**as_torch(cached), "prompt_embeds": torch.from_numpy(cached["prompt_embeds"][::-1].copy())}
        assert (task.losses(task.module, swapped, step) - live).abs().max() > 1e-4


def test_generate_draws_flux_at_its_distilled_guidance_unless_told(flux, tmp_path):
    """`diffray generate` without --guidance renders a Flux model at 3.5 (FluxPipeline's default), not 7.5."""
    from diffray.generate import generate_grid

    def grid(name: str, guidance=None) -> np.ndarray:
        from PIL import Image

        path = generate_grid(["a red circle"], None, str(flux), tmp_path / f"{name}.png", steps=2, guidance=guidance)
        return np.asarray(Image.open(path))

    plain = grid("plain")
    assert np.array_equal(plain, grid("at-3.5", 3.5)) and not np.array_equal(plain, grid("at-7.5", 7.5))


def test_flux_shaped_has_the_real_architecture():
    """FLUX.1-dev's parameter counts on the meta device (nothing allocated): transformer 11,901,408,320, T5-XXL
    encoder 4,762,310,656; the T5 tokenizer (ours) spans T5's 32128-row table."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from diffray.models.flux_build import t5_tokenizer
    from diffray.models.tiny import is_flux, is_xl, preset_configs

    cfg = preset_configs("flux-shaped")
    assert is_flux("flux-shaped") and not is_xl("flux-shaped") and cfg["transformer"]["guidance_embeds"]
    tok = t5_tokenizer(**cfg["tokenizer_2"])
    assert len(tok) == 32128 and tok.model_max_length == 512
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**cfg["transformer"])
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok), **cfg["text_encoder_2"]))
        vae = AutoencoderKL(**cfg["vae"])
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in [("transformer", transformer), ("t5", t5)]}
    assert count == {"transformer": 11_901_408_320, "t5": 4_762_310_656}, count
    assert vae.config.latent_channels * 4 == cfg["transformer"]["in_channels"]


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_flux_timestep_sampling_follows_the_flow_section(flux, sampling):
    """Each density's sigmas (keyed per row, so a row's sigma does not depend on its batch) against
    diffusers' `compute_density_for_timestep_sampling` formulas over many rows; the shift maps them."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from diffray.flow_config import FlowSection
    from diffray.trainers.components.diffusion import sample_noise_and_timesteps

    comps = Flux().load(str(flux))
    ids = list(range(4000))
    _, index = sample_noise_and_timesteps((1, 1, 1), ids, 0, 0, 1000)
    flow = FlowSection(timestep_sampling=sampling)
    ours = Flux.sigmas(comps.noise_scheduler, index, ids, 0, 0, flow)
    assert torch.equal(ours[:7], Flux.sigmas(comps.noise_scheduler, index[:7], ids[:7], 0, 0, flow))
    u = compute_density_for_timestep_sampling(sampling if sampling != "uniform" else "none", 4000,
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(0))
    stock = comps.noise_scheduler.sigmas[(u * 1000).long().clamp(0, 999)]
    for q in (0.1, 0.5, 0.9):  # same distribution: quantiles agree to sampling error
        assert abs(torch.quantile(ours, q) - torch.quantile(stock, q)) < 0.03, (q, sampling)
    shifted = Flux.sigmas(comps.noise_scheduler, index, ids, 0, 0, flow.model_copy(update={"shift": 3.0}))
    s = (1000 - index).float() / 1000 if sampling == "uniform" else None
    if s is not None:
        torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert shifted.median() > ours.median() + 0.1  # a shift > 1 moves training toward high noise


def test_flow_settings_are_refused_by_the_ddpm_families_naming_the_field(tmp_path):
    from diffray.methods import method_of

    sd = build_pipeline_dir(tmp_path / "sd", "tiny-random", seed=0)
    method_of("lora").family_check(job("lora"), str(sd))
    for override, field in [("flow.shift=3.0", "flow.shift"), ("flow.timestep_sampling=logit_normal",
                                                                "flow.timestep_sampling")]:
        with pytest.raises(ConfigError, match="flow-matching settings apply to Flux models only") as err:
            method_of("lora").family_check(job("lora", override), str(sd))
        assert field in str(err.value)
    with pytest.raises(ConfigError, match="flow.shfit"):
        job("lora", "flow.shfit=3")
