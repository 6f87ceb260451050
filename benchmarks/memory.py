"""Model-state memory per GPU for each model family and training strategy, computed from the real
architectures' parameter counts (`builtin:sd15-shaped`, `builtin:sdxl-shaped`, `builtin:flux-shaped`,
instantiated on the meta device: nothing is allocated, no GPU needed). "UNet" below is the denoiser: Flux's
transformer.

Counted per GPU, in GiB, for bf16 mixed precision with AdamW (the ZeRO paper's accounting): the text
encoders and VAE are frozen bf16 weights (2 bytes/parameter: diffray casts frozen parts to the run's
half precision on GPUs); a trained parameter costs 16 bytes (bf16 weights 2 + bf16 gradients 2 + fp32
master weights and Adam's two moments 12; DDP's fp32 weights + autocast also come to 16). ZeRO-2
partitions gradients and optimizer state over the N GPUs (2 + 14/N bytes), ZeRO-3 everything (16/N).
The frozen UNet under a LoRA is 4 bytes/parameter with DDP (fp32, autocast), 2 under DeepSpeed bf16 and
2/N under ZeRO-3, which partitions the engine's frozen weights too (the text encoders and VAE stay whole).
LoRA: rank `--lora-rank` on the UNet attention projections (to_q, to_k, to_v, to_out.0), counted from
the modules' shapes.
Activations are NOT included: they grow with resolution and micro-batch and shrink with
gradient checkpointing; measure them on a GPU (`benchmarks/gpu.py` reports peak memory).

    python benchmarks/memory.py                    # table on stdout; benchmarks/results/memory.json
    python benchmarks/memory.py --gpus 4 --lora-rank 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
GIB = 1024 ** 3


def parameter_counts(preset: str, lora_rank: int) -> dict[str, int]:
    """Parameters of each part of a preset (meta device; "unet" is the denoiser: a Flux preset's
    transformer), and of a rank-`lora_rank` LoRA on its attention projections."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffray.models.tiny import SD15_VOCAB, preset_configs

    cfgs = preset_configs(preset)
    with torch.device("meta"):  # not accelerate's init_empty_weights: it unties T5's shared embedding
        flux = "transformer" in cfgs
        denoiser = FluxTransformer2DModel(**cfgs["transformer"]) if flux else UNet2DConditionModel(**cfgs["unet"])
        parts = {"unet": denoiser, "vae": AutoencoderKL(**cfgs["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=SD15_VOCAB, **cfgs["text_encoder"]))}
        if flux:
            vocab = cfgs["tokenizer_2"].get("vocab_size", 32128)
            parts["text_encoder_2"] = T5EncoderModel(T5Config(vocab_size=vocab, **cfgs["text_encoder_2"]))
        elif "text_encoder_2" in cfgs:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=SD15_VOCAB,
                                                                                 **cfgs["text_encoder_2"]))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    counts["lora"] = sum(lora_rank * (m.in_features + m.out_features) for name, m in parts["unet"].named_modules()
                         if name.endswith(TARGETS) and hasattr(m, "in_features"))
    return counts


def per_gpu_gib(counts: dict[str, int], gpus: int) -> dict[str, float]:
    """Model-state GiB per GPU of each strategy (see the module docstring)."""
    frozen_rest = 2 * sum(v for k, v in counts.items() if k not in ("unet", "lora"))
    unet = counts["unet"]
    lora = counts["lora"]
    return {
        "lora (ddp: fp32 unet, autocast)": (4 * unet + 16 * lora + frozen_rest) / GIB,
        f"lora (zero-2 bf16, {gpus} gpus)": (2 * unet + (2 + 14 / gpus) * lora + frozen_rest) / GIB,
        f"lora (zero-3 bf16, {gpus} gpus)": (2 / gpus * unet + 16 / gpus * lora + frozen_rest) / GIB,
        "full unet (ddp)": (16 * unet + frozen_rest) / GIB,
        f"full unet (zero-2, {gpus} gpus)": ((2 + 14 / gpus) * unet + frozen_rest) / GIB,
        f"full unet (zero-3, {gpus} gpus)": (16 / gpus * unet + frozen_rest) / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8, help="GPUs ZeRO partitions over")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    results = {}
    for family, preset in (("stable-diffusion (SD 1.5)", "sd15-shaped"), ("stable-diffusion-xl", "sdxl-shaped"),
                           ("flux (FLUX.1-dev)", "flux-shaped")):
        counts = parameter_counts(preset, args.lora_rank)
        results[family] = {"preset": preset, "parameters": counts, "gib_per_gpu": per_gpu_gib(counts, args.gpus)}
    strategies = list(next(iter(results.values()))["gib_per_gpu"])
    print("| family | UNet/transformer params | text encoder params | LoRA params (rank %d) | " % args.lora_rank
          + " | ".join(strategies) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(strategies))
    for family, r in results.items():
        c = r["parameters"]
        text = c["text_encoder"] + c.get("text_encoder_2", 0)
        print(f"| {family} | {c['unet'] / 1e6:,.1f}M | {text / 1e6:,.1f}M | {c['lora'] / 1e6:,.2f}M | "
              + " | ".join(f"{r['gib_per_gpu'][s]:.1f}" for s in strategies) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gpus": args.gpus, "lora_rank": args.lora_rank, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
