"""Tiny-model factory and model loading: deterministic, loadable by stock diffusers, offline, built once."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import diffray.models.tiny as tiny
from diffray.errors import ModelError
from diffray.models import build_pipeline_dir, load_components, load_pipeline, preset_configs, resolve_model_path

os.environ["HF_HUB_OFFLINE"] = "1"


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*.safetensors")):
        h.update(f.relative_to(d).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def seed0(tmp_path_factory) -> Path:
    return build_pipeline_dir(tmp_path_factory.mktemp("m") / "tiny", "tiny-random", seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIFFRAY_CACHE", str(tmp_path))
    return tmp_path


def test_same_seed_same_bytes_other_seed_differs(seed0, tmp_path):
    assert digest(build_pipeline_dir(tmp_path / "again", "tiny-random", seed=0)) == digest(seed0)
    assert digest(build_pipeline_dir(tmp_path / "other", "tiny-random", seed=1)) != digest(seed0)
    size = sum(f.stat().st_size for f in seed0.rglob("*") if f.is_file())
    assert size < 10 * 2**20, f"tiny model is {size / 2**20:.1f} MiB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temp dirs left


def test_build_leaves_caller_rng_alone(tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_pipeline_dir(tmp_path / "m", "tiny-random", seed=7)
    assert torch.equal(torch.get_rng_state(), state)


def test_failed_build_leaves_nothing_at_out_dir(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_save_controlnet", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_pipeline_dir(tmp_path / "m", "tiny-random")
    assert list(tmp_path.iterdir()) == []


def test_stock_pipeline_loads_and_generates_64px(seed0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(seed0, safety_checker=None)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == 64
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and out.images.std() > 0


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_scheduler_config_serves_other_schedulers(seed0, name):
    import diffusers

    cls = getattr(diffusers, name)
    sched = cls.from_pretrained(seed0, subfolder="scheduler")
    sched.set_timesteps(2)
    assert len(sched.timesteps) >= 2 and sched.config.beta_schedule == "scaled_linear"
    if name == "DDIMScheduler":
        assert sched.config.set_alpha_to_one is False and sched.config.steps_offset == 1


def test_tokenizer_round_trips_and_pads_to_77(seed0):
    comps = load_components(str(seed0))
    tok, cfg = comps.tokenizer, comps.text_encoder.config
    ids = tok("A red circle, 3px!", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.model_max_length == 77 and len(ids) == 77
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredcircle,3px!"
    assert (len(tok), cfg.vocab_size) == (514, 514)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                      tok.pad_token_id) == (512, 513, 513)
    vocab = json.loads((seed0 / "tokenizer" / "vocab.json").read_text())  # slow-tokenizer files ship too
    assert len(vocab) == 514 and (seed0 / "tokenizer" / "merges.txt").read_text() == "#version: 0.2\n"


def test_load_components_dtype_and_scheduler(seed0):
    comps = load_components(str(seed0), dtype=torch.bfloat16)
    assert {comps.unet.dtype, comps.vae.dtype, comps.text_encoder.dtype} == {torch.bfloat16}
    assert type(comps.noise_scheduler).__name__ == "DDPMScheduler"
    assert comps.noise_scheduler.config.prediction_type == "epsilon"
    assert load_pipeline(str(seed0)).unet.config.cross_attention_dim == 32


def test_controlnet_loads(seed0):
    from diffusers import ControlNetModel, UNet2DConditionModel

    cn = ControlNetModel.from_pretrained(seed0 / "controlnet")
    unet = UNet2DConditionModel.from_pretrained(seed0, subfolder="unet")
    assert cn.config.block_out_channels == unet.config.block_out_channels
    assert torch.equal(cn.conv_in.weight, unet.conv_in.weight)


def test_builtin_is_built_once_even_when_raced(cache, monkeypatch):
    calls = []
    real_build = tiny.build_pipeline_dir
    monkeypatch.setattr(tiny, "build_pipeline_dir", lambda *a, **k: calls.append(a) or real_build(*a, **k))
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: resolve_model_path("builtin:tiny-random?seed=3"), range(4)))
    target = cache / "models" / f"tiny-random-seed3-{tiny.builder_key('tiny-random')}"
    assert paths == {str(target)} and len(calls) == 1
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_model_path("builtin:tiny-random?seed=3") == paths.pop() and len(calls) == 1
    assert weights.stat().st_mtime_ns == stamp


def test_builtin_default_seed_is_zero(cache, seed0):
    path = Path(resolve_model_path("builtin:tiny-random"))
    assert path == cache / "models" / f"tiny-random-seed0-{tiny.builder_key('tiny-random')}"
    assert digest(path) == digest(seed0)


def test_a_changed_builder_is_built_into_a_new_cache_dir(cache, monkeypatch):
    """The cache is keyed by the builder's content: a builtin built by an older builder is not served."""
    first = Path(resolve_model_path("builtin:tiny-random?seed=5"))
    real = tiny.preset_configs

    def wider_text_encoder(preset: str) -> dict:
        cfgs = real(preset)
        return {**cfgs, "text_encoder": {**cfgs["text_encoder"], "intermediate_size": 41}}

    monkeypatch.setattr(tiny, "preset_configs", wider_text_encoder)
    second = Path(resolve_model_path("builtin:tiny-random?seed=5"))
    assert second != first and second.parent == first.parent
    te_size = lambda d: json.loads((d / "text_encoder" / "config.json").read_text())["intermediate_size"]  # noqa: E731
    assert (te_size(first), te_size(second)) == (37, 41)
    monkeypatch.setattr(tiny, "preset_configs", real)
    assert Path(resolve_model_path("builtin:tiny-random?seed=5")) == first  # the old builder's dir is still its own
    key = tiny.builder_key("tiny-random")
    monkeypatch.setattr(tiny, "BUILDER_VERSION", tiny.BUILDER_VERSION + 1)
    assert tiny.builder_key("tiny-random") != key  # a bumped builder version (new init, shipped weights) too


def test_errors_name_the_path_or_the_presets(tmp_path):
    with pytest.raises(ModelError, match=r"allowed: builtin:tiny, builtin:tiny-random, builtin:sd15-shaped"):
        resolve_model_path("builtin:huge")
    with pytest.raises(ModelError, match=r"seed"):
        resolve_model_path("builtin:tiny-random?seed=abc")
    with pytest.raises(ModelError, match=f"{tmp_path / 'nope'}: model dir does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match=f"{tmp_path}: not a diffusers model dir.*model_index.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError,
                       match=r"unknown model preset 'xl' \(allowed: tiny, tiny-random, sd15-shaped, tiny-sdxl, "
                             r"sdxl-shaped, tiny-flux, flux-shaped\)"):
        build_pipeline_dir(tmp_path / "x", preset="xl")
    assert not (tmp_path / "x").exists()
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_model_path(hub_id) == hub_id


def test_incomplete_dir_is_a_model_error(seed0, tmp_path):
    import shutil

    no_tok, no_vae = (Path(shutil.copytree(seed0, tmp_path / name)) for name in ("no_tok", "no_vae"))
    shutil.rmtree(no_tok / "tokenizer")  # transformers 5 alone would load an empty tokenizer here
    for load in (load_components, load_pipeline):
        with pytest.raises(ModelError, match=f"{no_tok}: cannot load tokenizer"):
            load(str(no_tok))
    (no_vae / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"{no_vae}: cannot load vae"):
        load_components(str(no_vae))


def test_sd15_shaped_has_the_real_architecture():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = preset_configs("sd15-shaped")
    assert cfg["unet"]["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["unet"]["cross_attention_dim"] == 768
    assert cfg["vae"]["block_out_channels"] == (128, 256, 512, 512)
    with init_empty_weights():
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=tiny.SD15_VOCAB, **cfg["text_encoder"]))
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in
             [("unet", unet), ("vae", vae), ("text", text)]}
    assert 859e6 < count["unet"] < 860e6, count  # SD 1.5: 859.52M
    assert 83e6 < count["vae"] < 84e6, count  # 83.65M
    assert 123e6 < count["text"] < 124e6, count  # CLIP ViT-L/14 text tower: 123.06M


def test_sdxl_shaped_has_the_real_architecture():
    """SDXL base 1.0's parameter counts, on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = preset_configs("sdxl-shaped")
    assert tiny.is_xl("sdxl-shaped") and cfg["vae"]["scaling_factor"] == 0.13025
    with init_empty_weights():
        unet = UNet2DConditionModel(**cfg["unet"])
        one = CLIPTextModel(CLIPTextConfig(vocab_size=tiny.SD15_VOCAB, **cfg["text_encoder"]))
        two = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=tiny.SD15_VOCAB, **cfg["text_encoder_2"]))
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in [("unet", unet), ("one", one), ("two", two)]}
    assert count == {"unet": 2_567_463_684, "one": 123_060_480, "two": 694_659_840}, count


def _model_configs(root: Path, flux: bool) -> None:
    """The config files `native_size` reads, as an SD 2.x-like model (UNet 96 x VAE factor 8) or a Flux one
    (no UNet; the VAE's 1024) lays them out."""
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(json.dumps({"sample_size": 1024,
                                                           "block_out_channels": [128, 256, 512, 512]}))
    if flux:
        (root / "transformer").mkdir()
        (root / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "FluxTransformer2DModel"]}))
    else:
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps({"sample_size": 96}))
        (root / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))


def test_native_size_is_read_from_the_config_files_of_a_local_dir_or_a_hub_model(tmp_path, monkeypatch, caplog):
    """The size a served request without one is drawn at: a hub model's config files are read through
    huggingface_hub's cache as `from_pretrained` reads them (this one was 512 for any hub id, an SDXL or Flux
    base included); a model whose files cannot be read is 512 with a warning that names it."""
    import huggingface_hub.constants as hub

    from diffray.models.loading import native_size

    assert native_size(resolve_model_path("builtin:tiny-random")) == 64
    rev = "0123456789abcdef0123456789abcdef01234567"
    for name, flux, want in (("sd2-like", False, 768), ("flux-like", True, 1024)):
        _model_configs(tmp_path / "local" / name, flux)
        assert native_size(str(tmp_path / "local" / name)) == want
        repo = tmp_path / "hub" / f"models--org--{name}"  # huggingface_hub's own cache layout
        _model_configs(repo / "snapshots" / rev, flux)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # the cache only: no network here
    assert (native_size("org/sd2-like"), native_size("org/flux-like")) == (768, 1024)
    with caplog.at_level("WARNING", logger="diffray.models.loading"):
        assert native_size("org/not-cached") == 512
    assert "native size of model org/not-cached is unknown" in caplog.text and "set default_size" in caplog.text
