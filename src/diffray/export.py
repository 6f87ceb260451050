"""`diffray export`: a LoRA artifact written in another layout (kohya for A1111/ComfyUI, diffusers, PEFT), or a
Textual Inversion artifact as the embedding file A1111/ComfyUI take from `embeddings/` (kohya) or as is (diffusers).

A command module of its own so `cli.py` stays one screenful per command group; it only parses and prints.
The conversion is `diffray.models.lora_formats` (and `ti_formats` for embeddings). Never imports ray.
"""

from __future__ import annotations

from pathlib import Path

import typer


def export_command(
    artifact: Path = typer.Argument(..., help="A LoRA run's artifact dir (pytorch_lora_weights.safetensors) or a "
                                              "Textual Inversion run's (learned_embeds.safetensors)"),
    out: Path = typer.Argument(..., help="Output dir: new, empty or an earlier export (replaced whole), with the card"),
    fmt: str = typer.Option(..., "--format", "-f", help="kohya (A1111/ComfyUI) | diffusers | peft (LoRA only)"),
) -> None:
    """Write a LoRA artifact in another layout: kohya (`lora_unet_*`, `.alpha`), diffusers or PEFT; or a Textual
    Inversion as an A1111/ComfyUI embedding (kohya: OUT/<token as a file name>.safetensors, `emb_params` or
    SDXL's clip_l/clip_g) or as is (diffusers)."""
    from diffray.models.lora_formats import export_artifact

    done = export_artifact(artifact, fmt, out)
    typer.echo(f"exported {artifact} as {fmt} to {out}: " + ", ".join(sorted(p.name for p in done.iterdir())))
