"""Tiny-model factory and model loading: deterministic, loadable by stock diffusers, offline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from diffray.errors import ModelError
from diffray.models.loading import load_components, resolve_model_path
from diffray.models.tiny import build_pipeline_dir, preset_configs


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*.safetensors")):
        h.update(f.relative_to(d).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def seed0(tmp_path_factory) -> Path:
    return build_pipeline_dir(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def test_same_seed_same_bytes_other_seed_differs(seed0, tmp_path):
    assert digest(build_pipeline_dir(tmp_path / "again", seed=0)) == digest(seed0)
    assert digest(build_pipeline_dir(tmp_path / "other", seed=1)) != digest(seed0)
    size = sum(f.stat().st_size for f in seed0.rglob("*") if f.is_file())
    assert size < 16 * 2**20, f"tiny model is {size / 2**20:.1f} MiB"


def test_stock_pipeline_loads_and_generates(seed0):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(seed0, safety_checker=None)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == 64
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 64, 64, 3) and img.std() > 0
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and pipe.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredcircle"
    cn = ControlNetModel.from_pretrained(seed0 / "controlnet")
    assert cn.config.block_out_channels == pipe.unet.config.block_out_channels


def test_builtin_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRAY_CACHE", str(tmp_path))
    path = Path(resolve_model_path("builtin:tiny?seed=3"))
    assert path == tmp_path / "models" / "tiny-seed3" and (path / "model_index.json").is_file()
    stamp = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("builtin:tiny?seed=3") == str(path)
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    comps = load_components(str(path))
    assert comps.noise_scheduler.config.prediction_type == "epsilon"


def test_errors_name_path_and_presets(tmp_path):
    with pytest.raises(ModelError, match=r"allowed: builtin:tiny, builtin:sd15-shaped"):
        resolve_model_path("builtin:huge")
    with pytest.raises(ModelError, match=f"{tmp_path}.*no model_index.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="unknown model preset 'xl'"):
        build_pipeline_dir(tmp_path / "x", preset="xl")
    assert not (tmp_path / "x").exists()
    assert resolve_model_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


def test_sd15_shaped_has_the_real_architecture():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    cfg = preset_configs("sd15-shaped")
    assert cfg["unet"]["block_out_channels"] == (320, 640, 1280, 1280) and cfg["unet"]["cross_attention_dim"] == 768
    with init_empty_weights():
        unet = UNet2DConditionModel(**cfg["unet"])
    n = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n < 865e6, n  # SD 1.5's UNet has 859.5M parameters
