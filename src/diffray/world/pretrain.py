"""`diffray pretrain-world`: train the tiny world model from random weights, reproducibly from a seed.

Three training stages; the first and the last are Ray Train runs of a shipped method (so they checkpoint and
resume: rerunning the same command continues where it stopped, and a finished stage is not run again):

1. `vae`: the autoencoder (AutoencoderKL of the `tiny` architecture, from scratch) on the `all` split,
   every concept of the world (a codec, like SD's VAE: it sees no caption).
2. `text`: the text encoder, from scratch, learns to name every field of the `pretrain` split's captions
   (`diffray.world.caption_encoder`, in this process, about a minute), and is frozen from then on: trained
   jointly with the UNet it collapsed the position words (docs/world.md, "Where position is lost").
3. `unet`: `method: full` from scratch, the UNet on the frozen text encoder, on the `pretrain` split only (no
   reserved concept, no held-out triple), with caption dropout (classifier-free guidance) and an EMA of the
   weights.
4. assemble: the pipeline dir (EMA weights; the word-level tokenizer; a ControlNet initialised from the
   UNet, for `controlnet` configs) with `diffray_model.json` and a README card recording the command,
   steps, wall times and losses.
5. eval: `diffray eval` of the result on the `prompts` and `heldout` suites (`eval_num` pairs each, the
   evaluation protocol), written into the card (skipped with `eval_num=0`).

Like `diffray.world.evaluate`, this module drives Ray (and `caption_encoder` torch, in-process); the rest of
`diffray.world` is pure.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from diffray.errors import ConfigError
from diffray.paths import check_replaceable
from diffray.world.caption_encoder import train_caption_encoder


@dataclass(frozen=True)
class PretrainPlan:
    """What `pretrain_world` runs. The defaults are the shipped `builtin:tiny` (see its card)."""

    seed: int = 0
    vae_images: int = 20_000
    unet_images: int = 30_000
    vae_steps: int = 4_000
    unet_steps: int = 8_000
    vae_batch: int = 32  # per optimizer step, over all workers
    unet_batch: int = 64
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    text_steps: int = 400  # caption-field steps of the text encoder (stage 2)
    text_batch: int = 256
    text_lr: float = 1e-3
    position_p: float = 0.5  # share of the UNet's captions that state a position (the world's default: 0.25)
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    num_workers: int = 2
    checkpoint_every: int = 500
    eval_num: int = 64  # prompt/seed pairs per eval suite in the card (0: no eval)

    def check(self) -> None:
        for name in ("vae_images", "unet_images", "vae_steps", "unet_steps", "vae_batch", "unet_batch",
                     "text_steps", "text_batch", "num_workers", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.eval_num < 0:
            raise ConfigError(f"must be >= 0, got {self.eval_num}", field="eval_num")
        if not 0 <= self.position_p <= 1:
            raise ConfigError(f"must be a probability in [0, 1], got {self.position_p}", field="position_p")
        for name in ("vae_batch", "unet_batch"):
            if getattr(self, name) % self.num_workers:
                raise ConfigError(f"{getattr(self, name)} does not split over {self.num_workers} workers",
                                  field=name)


def _base(work: Path, seed: int) -> Path:
    """The `tiny` architecture at random (seeded), where pretraining starts."""
    from diffray.models.tiny import build_pipeline_dir

    d = work / "random"
    if not (d / "model_index.json").is_file():
        build_pipeline_dir(d, "tiny", seed=seed, random_init=True)
    return d


def _data(work: Path, split: str, n: int, seed: int, position_p: float | None = None) -> Path:
    from diffray.world.scenes import SIZE_WORD_P
    from diffray.world.writers import write_world_dataset

    p = SIZE_WORD_P if position_p is None else position_p
    d = work / "data" / (f"{split}-{n}-seed{seed}" + ("" if p == SIZE_WORD_P else f"-position{p:g}"))
    if not (d / "dataset.json").is_file():
        write_world_dataset(d, split, n, seed, fmt="parquet", position_p=p)
    return d


def _common(plan: PretrainPlan, work: Path, name: str, model: Path, data: Path, steps: int, batch: int,
            lr: float) -> dict:
    return {
        "run": {"name": name, "storage_path": str(work / "runs"), "seed": plan.seed},
        "model": {"path": str(model)},
        "data": {"path": str(data), "resolution": 64, "center_crop": True, "random_flip": False},
        "optim": {"lr": lr, "lr_scheduler": "cosine", "warmup_steps": min(200, steps // 10),
                  "max_grad_norm": 1.0},
        "train": {"max_steps": steps, "micro_batch_size": batch // plan.num_workers,
                  "checkpoint_every": min(plan.checkpoint_every, steps), "keep_checkpoints": 2,
                  "log_every": 10},
        "scaling": {"num_workers": plan.num_workers, "cpus_per_worker": 1},
        "strategy": {"name": "ddp"},
        "failure": {"max_failures": 2},
    }


def vae_config(plan: PretrainPlan, work: Path, model: Path, data: Path) -> dict:
    cfg = _common(plan, work, "world-vae", model, data, plan.vae_steps, plan.vae_batch, plan.vae_lr)
    cfg["method"] = "vae"
    cfg["vae"] = {"from_scratch": True, "kl_weight": 1e-6, "scaling_samples": 256}
    return cfg


def unet_config(plan: PretrainPlan, work: Path, model: Path, data: Path) -> dict:
    cfg = _common(plan, work, "world-unet", model, data, plan.unet_steps, plan.unet_batch, plan.unet_lr)
    cfg["method"] = "full"
    cfg["full"] = {"from_scratch": True, "train_text_encoder": False}  # the encoder of stage 2, frozen
    cfg["data"]["caption_dropout"] = plan.caption_dropout
    cfg["data"]["cache"] = "auto"  # latents encoded once by the trained VAE, not at every step
    cfg["train"]["ema_decay"] = plan.ema_decay
    return cfg


def _stage(cfg_dict: dict, progress) -> dict:
    """Run (or resume, or skip when its artifact exists) one stage; its figures for the card."""
    from diffray.methods import validate_config
    from diffray.trainers.runner import run_training

    cfg = validate_config(cfg_dict)
    artifact = Path(cfg.run.storage_path) / cfg.run.name / "artifact"
    done = artifact / "diffray_stage.json"
    if done.is_file():
        return json.loads(done.read_text())
    result = run_training(cfg, on_progress=progress(cfg) if progress else None)
    figures = {"method": cfg.method, "steps": result.steps, "wall_time_s": round(result.wall_time_s, 1),
               "loss_first": result.loss_first_mean, "loss_last": result.loss_last_mean,
               "config": cfg_dict, "artifact": result.artifact_dir}
    done.write_text(json.dumps(figures, indent=2))
    return figures


def _with_vae(base: Path, vae_artifact: Path, dest: Path) -> Path:
    """`base` with its VAE replaced by the trained one (whose config carries the scaling factor)."""
    from diffray.world.writers import atomic_dir

    if not (dest / "model_index.json").is_file():
        with atomic_dir(dest, "model_index.json") as tmp:
            shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("vae"))
            shutil.copytree(vae_artifact, tmp / "vae", ignore=shutil.ignore_patterns("*.md", "*.json", "samples*"))
            shutil.copy2(vae_artifact / "config.json", tmp / "vae" / "config.json")
    return dest


def _assemble(unet_artifact: Path, out: Path, card: dict) -> Path:
    """The shipped layout: the EMA pipeline (no `non_ema` variant), a ControlNet from its UNet, the card."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from diffray.models.tiny import tokenizer_words, write_tokenizer_files
    from diffray.world.writers import atomic_dir

    with atomic_dir(out, "diffray_model.json") as tmp:
        shutil.copytree(unet_artifact, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*non_ema*", "samples*", "README.md", "diffray_stage.json",
                                                      "diffray_card.json"))
        # transformers 5 saves only tokenizer.json; the slow-tokenizer files keep 4.x loaders working.
        write_tokenizer_files(tmp / "tokenizer", None, tokenizer_words("tiny"))
        unet = UNet2DConditionModel.from_pretrained(tmp, subfolder="unet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(card["plan"]["seed"] + 1)
            ControlNetModel.from_unet(unet).save_pretrained(tmp / "controlnet", safe_serialization=True)
        (tmp / "diffray_model.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(card))
    return out


def model_card(card: dict) -> str:
    """The README of the pretrained world model: what it is, how it was made, its figures."""
    plan, st = card["plan"], card["stages"]
    lines = ["# diffray tiny world model", "",
             "A text-to-image Stable Diffusion pipeline (64 px, 8x8 latents) trained from random weights on the "
             "diffray shapes world by `diffray pretrain-world`. Word-level tokenizer over the world's words. The "
             "VAE saw every concept's images (a codec). The text encoder first learned to name every field of the "
             "`pretrain` split's captions, then stayed frozen while the UNet trained on that split: the reserved "
             "concepts (star, cyan, striped, sks widget) and the held-out triples were never shown.", "",
             f"Command: `{card['command']}`", "",
             "| stage | method | steps | wall | first loss | last loss |", "|---|---|---:|---:|---:|---:|"]
    for name, s in st.items():
        lines.append(f"| {name} | {s['method']} | {s['steps']} | {s['wall_time_s'] / 60:.1f} min | "
                     f"{s['loss_first']:.4f} | {s['loss_last']:.4f} |")
    if st.get("text", {}).get("heldout_accuracy"):
        lines += ["", "Text encoder, held-out captions: field named right " + ", ".join(
            f"{f} {a:.1%}" for f, a in st["text"]["heldout_accuracy"].items()) + "."]
    lines += ["", f"Plan: `{json.dumps(plan)}`", ""]
    if card.get("eval"):
        lines += ["## Evaluation", "", "`diffray eval` (stock StableDiffusionPipeline, the model's scheduler, 25 "
                  "steps, guidance 5, 64 px, fixed seeds), accuracy per field read back by the classical reader:", "",
                  "| suite | pairs | " + " | ".join(EVAL_FIELDS) + " |", "|---|---:|" + "---:|" * len(EVAL_FIELDS)]
        for suite, row in card["eval"].items():
            cells = [f"{row[f]:.1%}" if row.get(f) is not None else "-" for f in EVAL_FIELDS]
            lines.append(f"| {suite} | {row['num']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


EVAL_FIELDS = ("bg", "colour", "shape", "size", "position", "all")


def eval_figures(model_dir: Path, num: int) -> dict:
    """Accuracy per field of `model_dir` on the `prompts` and `heldout` suites (`num` pairs each)."""
    from diffray.world.evaluate import evaluate

    out = {}
    for suite in ("prompts", "heldout"):
        result = evaluate(model=str(model_dir), suite=suite, num=num, compare_base=False)
        out[suite] = {"num": len(result.records), **{f: result.accuracy("base", f) for f in EVAL_FIELDS}}
    return out


def pretrain_world(out_dir: str | Path, plan: PretrainPlan = PretrainPlan(), work_dir: str | Path | None = None,
                   progress=None, command: str | None = None) -> dict:
    """Pretrain the world model into `out_dir` (replaced when done); intermediate data, runs and
    checkpoints live in `work_dir` (default `<out_dir>.work`), so a rerun resumes. Returns the card."""
    plan.check()
    out = Path(out_dir).expanduser().resolve()
    check_replaceable(out, "diffray_model.json")  # before hours of work, not at the end
    work = Path(work_dir).expanduser().resolve() if work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = _base(work, plan.seed)
    vae = _stage(vae_config(plan, work, base, _data(work, "all", plan.vae_images, plan.seed)), progress)
    with_vae = _with_vae(base, Path(vae["artifact"]), work / "random-with-vae")
    data = _data(work, "pretrain", plan.unet_images, plan.seed, plan.position_p)
    text = train_caption_encoder(with_vae, data, work / "random-with-vae-text", steps=plan.text_steps,
                                 batch=plan.text_batch, lr=plan.text_lr, seed=plan.seed)
    unet = _stage(unet_config(plan, work, Path(text["artifact"]), data), progress)
    card = {"preset": "tiny", "pretrained": True, "plan": asdict(plan),
            "command": command or f"diffray pretrain-world {shlex.quote(str(out_dir))} --seed {plan.seed}",
            "stages": {k: {**{key: v[key] for key in ("method", "steps", "wall_time_s", "loss_first", "loss_last",
                                                      "heldout_accuracy") if key in v},
                           "config": json.loads(json.dumps(v["config"]).replace(str(work), "<work>"))}
                       for k, v in (("vae", vae), ("text", text), ("unet", unet))},
            "wall_time_s_this_call": round(time.time() - t0, 1)}
    _assemble(Path(unet["artifact"]), out, card)
    if plan.eval_num:
        card["eval"] = eval_figures(out, plan.eval_num)
        (out / "diffray_model.json").write_text(json.dumps(card, indent=2) + "\n")
        (out / "README.md").write_text(model_card(card))
    return card
