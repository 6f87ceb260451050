"""Deterministic Stable Diffusion pipelines built from config, saved as real diffusers dirs.

`tiny` is a few-MB pipeline for tests and demos; `sd15-shaped` is the real SD 1.5 architecture with
random weights, for throughput benchmarks. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffray.errors import ModelError

PRESETS = ("tiny", "sd15-shaped")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def preset_configs(preset: str) -> dict[str, dict]:
    """Component configs (UNet, VAE, text encoder) of a preset."""
    if preset == "tiny":
        return {
            "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8, norm_num_groups=8),
            "vae": dict(sample_size=64, in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8),
            "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32),
        }
    if preset == "sd15-shaped":
        return {
            "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                         block_out_channels=(320, 640, 1280, 1280),
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                         cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
            "vae": dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32),
            "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                 hidden_act="quick_gelu"),
        }
    raise ModelError(f"unknown model preset {preset!r} (allowed: {', '.join(PRESETS)})")


def write_tokenizer_files(out_dir: Path, vocab_size: int | None = None) -> int:
    """A character-level CLIP BPE vocabulary (every byte, with and without `</w>`) and empty merges.

    Returns the vocabulary size. `vocab_size` pads with unused tokens (to match a real model's table).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + list(SPECIAL_TOKENS)
    if vocab_size is not None:
        tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def build_components(preset: str = "tiny", seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    """Instantiate every pipeline component with seeded random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfgs = preset_configs(preset)
    tok_dir = tokenizer_dir or Path(tempfile.mkdtemp(prefix="diffray-tok-"))
    vocab = write_tokenizer_files(tok_dir, 49408 if preset == "sd15-shaped" else None)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfgs["unet"])
    vae = AutoencoderKL(**cfgs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **cfgs["text_encoder"]))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_pipeline_dir(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Build a preset and save it with `save_pretrained` (safetensors); atomic: the dir appears whole.

    The tiny preset also gets a matching ControlNet under `controlnet/`.
    """
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from diffray.models.loading import quiet_hf

    preset_configs(preset)  # validate before any work
    quiet_hf()
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        comps = build_components(preset, seed, tokenizer_dir=tmp / "_tok")
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "_tok")
        if preset == "tiny":
            torch.manual_seed(seed + 1)
            ControlNetModel.from_unet(comps["unet"]).save_pretrained(tmp / "controlnet", safe_serialization=True)
        (tmp / "diffray_model.json").write_text(json.dumps({"preset": preset, "seed": seed}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
