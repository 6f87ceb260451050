"""The world's commands, `diffray eval` and `diffray pretrain-world` (their own module: cli.py holds the
core commands)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from diffray.world.pretrain import PretrainPlan

_D = PretrainPlan()


def pretrain_world_command(
    out_dir: Path = typer.Argument(..., help="Where the pretrained pipeline dir is written (replaced when done)"),
    seed: int = typer.Option(_D.seed, help="Seed of the weights' init, the data and the noise"),
    vae_steps: int = typer.Option(_D.vae_steps, help="Autoencoder optimizer steps"),
    unet_steps: int = typer.Option(_D.unet_steps, help="UNet optimizer steps (on the frozen text encoder)"),
    text_steps: int = typer.Option(_D.text_steps, help="Text-encoder steps naming the captions' fields"),
    position_p: float = typer.Option(_D.position_p, help="Share of the UNet's captions that state a position"),
    vae_images: int = typer.Option(_D.vae_images, help="Images of the `all` split for the autoencoder"),
    unet_images: int = typer.Option(_D.unet_images, help="Images of the `pretrain` split for the UNet"),
    vae_batch: int = typer.Option(_D.vae_batch, help="Autoencoder batch per step (all workers)"),
    unet_batch: int = typer.Option(_D.unet_batch, help="UNet batch per step (all workers)"),
    num_workers: int = typer.Option(_D.num_workers, help="Ray Train workers of each stage"),
    checkpoint_every: int = typer.Option(_D.checkpoint_every, help="Checkpoint every N steps"),
    eval_num: int = typer.Option(_D.eval_num, help="Prompt/seed pairs per eval suite (prompts, heldout) in the "
                                 "card; 0: no eval"),
    work_dir: Optional[Path] = typer.Option(None, help="Data, runs and checkpoints (default: OUT_DIR.work); "
                                            "rerunning with the same one resumes"),
) -> None:
    """Pretrain the tiny world model from random weights: the VAE on every concept's images, the text
    encoder on naming the pretraining captions' fields, then the UNet (`method: full`, from scratch) on the
    pretraining split with that encoder frozen. Resumable; see the card."""
    from diffray.console import train_progress
    from diffray.world.pretrain import pretrain_world

    plan = PretrainPlan(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, text_steps=text_steps,
                        vae_images=vae_images, unet_images=unet_images, vae_batch=vae_batch, unet_batch=unet_batch,
                        position_p=position_p, num_workers=num_workers, checkpoint_every=checkpoint_every,
                        eval_num=eval_num)
    command = "diffray " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    card = pretrain_world(out_dir, plan, work_dir, progress=train_progress, command=command)
    for name, s in card["stages"].items():
        typer.echo(f"{name}: {s['steps']} steps, loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}, "
                   f"{s['wall_time_s']:.0f}s")
    for suite, row in card.get("eval", {}).items():
        typer.echo(f"eval {suite} ({row['num']} pairs): " + ", ".join(
            f"{k} {v:.1%}" for k, v in row.items() if k != "num" and v is not None))
    typer.echo(f"wrote the world model to {Path(out_dir).resolve()}")


def eval_command(
    model: Optional[str] = typer.Option(None, help="Base model: builtin:tiny, a diffusers dir or hub id (default: "
                                        "the adapter's base, else builtin:tiny)"),
    suite: str = typer.Option("prompts", help="prompts | heldout | controlnet | subject | star | cyan | striped | "
                                              "triangle"),
    adapter: Optional[Path] = typer.Option(None, help="LoRA or Textual Inversion adapter dir"),
    controlnet: Optional[Path] = typer.Option(None, help="ControlNet dir (suite controlnet)"),
    num: Optional[int] = typer.Option(None, help="Prompt/seed pairs (default 64)"),
    seed: int = typer.Option(0, help="Suite seed: which scenes and generator seeds"),
    steps: int = typer.Option(25, help="Sampler steps"),
    guidance: float = typer.Option(5.0, help="Classifier-free guidance scale"),
    resolution: int = typer.Option(64, help="Image size"),
    token: Optional[str] = typer.Option(None, help="Textual Inversion token for the concept's words (default: the "
                                        "adapter's own token)"),
    compare_base: bool = typer.Option(True, help="Also render the base model (no adapter/control)"),
    lora_scale: float = typer.Option(1.0, help="LoRA strength"),
    batch_size: int = typer.Option(8, help="Images per pipeline call"),
    out: Path = typer.Option(Path("outputs/eval"), help="Folder for results.json, results.md, grid.png"),
    timestep_spacing: Optional[str] = typer.Option(None, help="leading | trailing | linspace: respace the model's "
                                                   "scheduler (default: as it is)"),
) -> None:
    """Render a fixed suite of world prompts (one Ray Data batch-inference job), read the images back with
    classical vision and print accuracy per field (and ControlNet / subject / JPEG figures)."""
    from diffray.world.evaluate import evaluate
    from diffray.world.report import format_table

    result = evaluate(model=model, suite=suite, adapter=str(adapter) if adapter else None,
                      controlnet=str(controlnet) if controlnet else None, num=num, seed=seed, steps=steps,
                      guidance=guidance, resolution=resolution, token=token, compare_base=compare_base,
                      lora_scale=lora_scale, batch_size=batch_size, out_dir=out / suite,
                      timestep_spacing=timestep_spacing)
    typer.echo(format_table(result))
    typer.echo(f"wrote {out / suite}/results.json, results.md, grid.png")


def pairs_command(
    out: Path = typer.Argument(..., help="Parquet file to write (replaced when done)"),
    model: Optional[str] = typer.Option(None, help="Model that draws the images (default builtin:tiny)"),
    suite: str = typer.Option("prompts", help="prompts | heldout: the suite whose prompts are drawn"),
    num: int = typer.Option(1000, help="Pairs (prompts)"),
    seed: int = typer.Option(1, help="Suite seed (diffray eval scores seed 0: the default draws other prompts)"),
    steps: int = typer.Option(25, help="Sampler steps"),
    guidance: float = typer.Option(5.0, help="Classifier-free guidance scale"),
    batch_size: int = typer.Option(8, help="Images per pipeline call"),
    images_per_prompt: int = typer.Option(2, help="Images drawn per prompt; above 2 the pair is a right and a "
                                          "wrong one when the prompt has both"),
    position_p: Optional[float] = typer.Option(None, help="Chance a prompt states a position (default: the "
                                               "suite's own, 0.25)"),
) -> None:
    """Preference pairs labelled by the world reader: two images per prompt from the model, the one the
    reader finds right preferred (both right: a tie, both wrong: both bad), in Pick-a-Pic's columns."""
    from diffray.world.labeller import label_pairs

    c = label_pairs(out, model=model, suite=suite, num=num, seed=seed, steps=steps, guidance=guidance,
                    batch_size=batch_size, images_per_prompt=images_per_prompt, position_p=position_p)
    typer.echo(f"{c['pairs']} pairs of suite {c['suite']} (seed {c['seed']}) by {c['model']}: {c['first']} prefer "
               f"jpg_0, {c['second']} jpg_1, {c['ties']} ties, {c['both_bad']} both bad; {c['accuracy']:.1%} of the "
               f"images right; {c['wall_s']:.0f}s")
    typer.echo(f"wrote {out}")
