"""Small models built from code for the CLIP-based rewards in tests and benchmarks (nothing downloaded), and
which tiny Stable Diffusion a test trains."""

from __future__ import annotations

from pathlib import Path

import torch

from diffray.models.tiny import write_tokenizer_files

# Mechanical tests (engines, resume, faults, formats) train the random `builtin:tiny-random`: fast, and its
# losses move from the first step. What must show learning on images uses the pretrained `builtin:tiny`
# (the shipped configs' default). A config override:
TINY_RANDOM = "model.path=builtin:tiny-random"


def build_tiny_clip(out_dir: str | Path, *, image_size: int = 32, patch_size: int = 8, vision_width: int = 32,
                    vision_layers: int = 2, projection_dim: int = 16, seed: int = 0) -> Path:
    """A small CLIP (model + processor, `save_pretrained`) for the CLIP-based rewards in tests and
    benchmarks: our own tokenizer files, a 2-layer text tower, a configurable vision tower."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(out_dir)
    vocab = write_tokenizer_files(out)
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
                           intermediate_size=4 * vision_width, num_hidden_layers=vision_layers, num_attention_heads=4),
        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out


def write_aesthetic_head(path: str | Path, in_features: int, seed: int = 3) -> Path:
    """A random LAION-layout aesthetic head (Linear layers at 0, 2, 4, 6, 7) as safetensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    widths = [in_features, 24, 12, 8, 4, 1]
    state = {}
    for i, (n, o) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n**0.5
        state[f"layers.{i}.bias"] = torch.randn(o, generator=g)
    save_file(state, str(path))
    return Path(path)
