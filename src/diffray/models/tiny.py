"""Stable Diffusion pipelines built from config and saved as real diffusers dirs, and the shipped one.

`tiny` is the pretrained world model: a few-MB pipeline (64 px images, 8x8 latents) trained on the shapes
world by `diffray pretrain-world` (`diffray.world.pretrain`), shipped as package data (`weights/tiny/`);
building it copies those weights. Its architecture, initialised at random, is where pretraining starts.
`tiny-random` is the older, smaller random pipeline for fast mechanical tests; `sd15-shaped` is the real
SD 1.5 architecture with *random* weights, for throughput benchmarks only (its images are noise);
`tiny-sdxl` is SDXL's layout (two text encoders, size/crop conditioning) at tiny size, random, and
`sdxl-shaped` SDXL base 1.0's real architecture with random weights (about 14 GB in fp32); `tiny-flux`
and `flux-shaped` the same for FLUX.1-dev (`diffray.models.flux`; flux-shaped is about 67 GB in fp32). `tiny`
uses a word-level CLIP tokenizer over the world's words (`diffray.world.WORDS`, every other word spelled
by characters); the others a character-level one. We write the tokenizer files ourselves. Nothing here
downloads anything, and building never disturbs the caller's global torch RNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffray.errors import ModelError
from diffray.paths import check_replaceable

PRESETS = ("tiny", "tiny-random", "sd15-shaped", "tiny-sdxl", "sdxl-shaped", "tiny-flux", "flux-shaped")
PRETRAINED = ("tiny",)  # presets whose builtin is shipped weights (one set: no `?seed=`)
WEIGHTS_DIR = Path(__file__).parent / "weights"
# Part of every cached builtin's key (`builder_key`): bump it when the builder writes different files for
# the same preset_configs (a new tokenizer, another init), so caches built before rebuild. Shipped weights
# are keyed by their card instead.
BUILDER_VERSION = 2
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_TOKENS = 77
SD15_VOCAB = 49408  # the sd15/sdxl-shaped tokenizers are padded to CLIP's embedding-table size
# SD 1.5's scheduler_config.json; the DDIM/PNDM-only keys make `from_config` of those match SD 1.5.
SCHEDULER_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False,
                        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def preset_configs(preset: str) -> dict[str, dict]:
    """Constructor kwargs of each component of a preset: `unet`, `vae`, `text_encoder` (CLIPTextConfig
    minus the vocabulary/token ids, which come from the tokenizer) and `scheduler`.

    Raises:
        ModelError: `preset` is not one of `PRESETS`.
    """
    if preset == "tiny":
        # Sized for CPU pretraining (~0.33 s per batch-64 UNet step, DDP on 2 cores). One norm group in the VAE:
        # per-channel GroupNorm erases the colour of a flat image, and the world is flat colours.
        return {
            "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                         up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64,
                         attention_head_dim=8, norm_num_groups=8),
            "vae": dict(sample_size=64, in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=1),
            "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64),
            "scheduler": dict(SCHEDULER_CONFIG),
        }
    if preset == "tiny-random":
        return {
            "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8, norm_num_groups=8),
            "vae": dict(sample_size=64, in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8),
            "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=32),
            "scheduler": dict(SCHEDULER_CONFIG),
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
                                 num_attention_heads=12, max_position_embeddings=MAX_TOKENS, projection_dim=768,
                                 hidden_act="quick_gelu"),
            "scheduler": dict(SCHEDULER_CONFIG),
        }
    if preset == "tiny-sdxl":
        # SDXL's layout at tiny size: two CLIP encoders (the second with a projection: the pooled embedding),
        # cross-attention on their concatenated penultimate states (32 + 32), the "text_time" added embedding
        # of six size/crop ids (8 channels each) plus the pooled 32, linear projections, 2 transformer layers.
        encoder = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=MAX_TOKENS, projection_dim=32)
        return {
            "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                         use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                         transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                         cross_attention_dim=64, norm_num_groups=8),
            "vae": dict(sample_size=64, in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8),
            "text_encoder": dict(encoder),
            "text_encoder_2": dict(encoder),
            "scheduler": dict(SCHEDULER_CONFIG, timestep_spacing="leading"),  # SDXL's Euler,
        }
    if preset == "sdxl-shaped":  # SDXL base 1.0's architecture (UNet 2.567B, CLIP-L + OpenCLIP bigG), random
        return {
            "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                         block_out_channels=(320, 640, 1280),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                         projection_class_embeddings_input_dim=2816, cross_attention_dim=2048, norm_num_groups=32),
            "vae": dict(sample_size=1024, in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
                        scaling_factor=0.13025, force_upcast=True),
            "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=MAX_TOKENS, projection_dim=768,
                                 hidden_act="quick_gelu"),
            "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, max_position_embeddings=MAX_TOKENS, projection_dim=1280,
                                   hidden_act="gelu"),
            "scheduler": dict(SCHEDULER_CONFIG, timestep_spacing="leading"),
        }
    if preset == "tiny-flux":
        # FLUX.1-dev's layout at tiny size (guidance-distilled: the guidance embedding), 1 double + 1 single
        # stream block (2 heads of 8, rope axes 2+2+4), 4 latent channels packed 2x2 (16 in), CLIP's pooled
        # 32 and a 1-layer T5 of 32 (sequence 32), the VAE with a shift factor and no quant convs as Flux's,
        # flow-matching Euler scheduler (shift 1).
        return {
            "transformer": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
            "vae": dict(sample_size=64, in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                        scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False),
            "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=MAX_TOKENS),
            "text_encoder_2": dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                   feed_forward_proj="gated-gelu"),
            "tokenizer_2": dict(model_max_length=32),
            "scheduler": dict(num_train_timesteps=1000, shift=1.0),
        }
    if preset == "flux-shaped":  # FLUX.1-dev's architecture (transformer 11.90B, T5-XXL 4.76B, CLIP-L), random
        return {
            "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
            "vae": dict(sample_size=1024, in_channels=3, out_channels=3, latent_channels=16,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
            "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=MAX_TOKENS, projection_dim=768,
                                 hidden_act="quick_gelu"),
            "text_encoder_2": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"),
            "tokenizer_2": dict(model_max_length=512, vocab_size=32128),
            "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        }
    raise ModelError(f"unknown model preset {preset!r} (allowed: {', '.join(PRESETS)})")


def builder_key(preset: str) -> str:
    """A short hash of what decides a preset's files besides the seed: its component configs, the
    tokenizer and BUILDER_VERSION, or for a pretrained preset its shipped card. Cached builtins are stored
    under it, so a changed builder or retrained weights are rebuilt instead of served stale. Raises
    ModelError for an unknown preset."""
    spec = {"builder": BUILDER_VERSION, "configs": preset_configs(preset), "vocab": _vocab_size(preset),
            "words": list(tokenizer_words(preset))}
    if is_flux(preset):
        from diffray.models.flux_build import T5_CHARS, T5_SPECIALS

        spec["t5"] = [T5_SPECIALS, T5_CHARS]
    if preset in PRETRAINED and shipped(preset):
        spec["card"] = (shipped(preset) / "diffray_model.json").read_text()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def tokenizer_words(preset: str) -> tuple[str, ...]:
    """The words a preset's tokenizer keeps whole (the world's vocabulary for `tiny`; none otherwise)."""
    if preset != "tiny":
        return ()
    from diffray.world import WORDS

    return WORDS


def word_merges(words) -> list[tuple[str, str]]:
    """BPE merges that assemble each of `words` into one token: byte-pair learning run to the end on the
    words themselves (always the most frequent pair, ties by sort order). Applied lowest rank first, as
    CLIP's tokenizer does, they rebuild every word whole."""
    import collections

    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        counts: collections.Counter = collections.Counter()
        for seg in segs.values():
            counts.update(zip(seg, seg[1:]))
        if not counts:
            return merges
        best = max(sorted(counts), key=counts.__getitem__)
        merges.append(best)
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = tuple(out)


def write_tokenizer_files(out_dir: Path, vocab_size: int | None = None, words=()) -> int:
    """Write a CLIP BPE `vocab.json` (every byte, with and without `</w>`, the merged pieces of `words`,
    then the two special tokens) and `merges.txt` (empty without words: character-level). `words` are
    split as CLIP's pre-tokenizer splits them (`close-up` is `close`, `-`, `up`). `vocab_size` pads with
    unused tokens.

    Returns the vocabulary size (514 without words or padding).
    """
    import re

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = word_merges({p for w in words for p in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", w.lower())})
    chars = list(bytes_to_unicode().values())
    merged = [a + b for a, b in merges]
    tokens = list(dict.fromkeys(chars + [c + "</w>" for c in chars] + merged)) + list(SPECIAL_TOKENS)
    if vocab_size is not None:
        tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(tokens)


def _vocab_size(preset: str) -> int | None:
    return SD15_VOCAB if preset in ("sd15-shaped", "sdxl-shaped", "flux-shaped") else None


def shipped(preset: str) -> Path | None:
    """The packaged pipeline dir of a pretrained preset, or None when its weights are not there."""
    d = WEIGHTS_DIR / preset
    return d if preset in PRETRAINED and (d / "model_index.json").is_file() else None


def is_xl(preset: str) -> bool:
    """An SDXL-layout preset (two text encoders and a UNet, `StableDiffusionXLPipeline`)."""
    return {"text_encoder_2", "unet"} <= set(preset_configs(preset))


def is_flux(preset: str) -> bool:
    """A Flux-layout preset (`FluxPipeline`: a transformer, CLIP + T5)."""
    return "transformer" in preset_configs(preset)


def build_components(preset: str = "tiny", seed: int = 0) -> dict:
    """Instantiate every pipeline component with random weights drawn from `torch.manual_seed(seed)`
    (in a forked RNG, so the caller's RNG state is untouched). Keys match `StableDiffusionPipeline`, or
    `StableDiffusionXLPipeline` for an SDXL preset (`tokenizer_2`, `text_encoder_2`: a CLIP encoder with
    projection, and an Euler scheduler, as SDXL ships)."""
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfgs = preset_configs(preset)
    with tempfile.TemporaryDirectory(prefix="diffray-tok-") as tok_dir:
        vocab = write_tokenizer_files(Path(tok_dir), _vocab_size(preset), tokenizer_words(preset))
        tokenizer = CLIPTokenizer(f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt", model_max_length=MAX_TOKENS)
        # SDXL's second tokenizer has the same vocabulary and pads with "!" (not end-of-text)
        tokenizer_2 = CLIPTokenizer(f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt", model_max_length=MAX_TOKENS,
                                    pad_token="!")

    def encoder_config(key: str):
        return CLIPTextConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfgs[key])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_flux(preset):
            from diffray.models.flux_build import build_flux_components

            return build_flux_components(cfgs, tokenizer, encoder_config("text_encoder"))
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(encoder_config("text_encoder"))
        if is_xl(preset):
            text_encoder_2 = CLIPTextModelWithProjection(encoder_config("text_encoder_2"))
    comps = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    if is_xl(preset):
        comps.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                     scheduler=EulerDiscreteScheduler.from_config(cfgs["scheduler"]))
    else:  # from_config keeps the DDIM/PNDM-only keys
        comps["scheduler"] = DDPMScheduler.from_config(cfgs["scheduler"])
    return comps


def _save_controlnet(unet: torch.nn.Module, out_dir: Path, seed: int) -> None:
    """A ControlNet initialised from the UNet (its conditioning embedding is the only random part)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        ControlNetModel.from_unet(unet).save_pretrained(out_dir, safe_serialization=True)


def build_pipeline_dir(out_dir: str | Path, preset: str = "tiny", seed: int = 0, random_init: bool = False) -> Path:
    """Build a preset and save it as a diffusers dir (safetensors). A pretrained preset (`tiny`) is a copy
    of its shipped weights unless `random_init` (its architecture at random, from `seed`: where
    pretraining starts). Atomic: everything is written to a temporary sibling that is then renamed onto
    `out_dir`, so a half-written dir never appears there (an existing `out_dir` that diffray wrote is
    replaced). The tiny presets also get a matching ControlNet in `controlnet/`.

    Returns the absolute output dir. Raises `ModelError` for an unknown preset (before any work), or for
    a pretrained preset asked for another seed or whose weights are not installed; `StorageError` (before
    any work) for an `out_dir` that is a file or a non-empty folder without `diffray_model.json`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffray.logs import quiet_hf

    preset_configs(preset)
    check_replaceable(out_dir, "diffray_model.json")
    source = None
    if preset in PRETRAINED and not random_init:
        source = shipped(preset)
        if source is None:
            raise ModelError(f"the pretrained {preset!r} weights are not installed ({WEIGHTS_DIR / preset}); "
                             f"`diffray pretrain-world DIR` trains them, `{preset}-random` is the random model")
        if seed != 0:
            raise ModelError(f"{preset!r} is one pretrained set of weights (no seed option); "
                             f"`tiny-random?seed={seed}` is the random model with that seed")
    quiet_hf()
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if source is not None:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            tmp.chmod(0o755)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
            return out
        comps = build_components(preset, seed)
        if is_flux(preset):
            from diffusers import FluxPipeline

            pipe = FluxPipeline(**comps)
        else:
            pipe = (StableDiffusionXLPipeline(**comps) if is_xl(preset) else
                    StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False))
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; the slow-tokenizer files keep 4.x loaders working.
        for tok in ("tokenizer", "tokenizer_2") if is_xl(preset) else ("tokenizer",):
            write_tokenizer_files(tmp / tok, _vocab_size(preset), tokenizer_words(preset))
        if preset in ("tiny", "tiny-random"):
            _save_controlnet(comps["unet"], tmp / "controlnet", seed)
        (tmp / "diffray_model.json").write_text(json.dumps({"preset": preset, "seed": seed,
                                                                "builder_key": builder_key(preset)}))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be read by other users' workers
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
