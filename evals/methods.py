"""Every method's quality figure on the tiny world (issue "every method proves it learns"): train each shipped
config on the pretrained `builtin:tiny`, score base vs trained with `diffray eval`, print the table and write
EVALS.md (command, figures against their floors, wall times, one grid PNG per method).

    .venv/bin/python evals/methods.py                      # every row (what `make eval` runs), ~85 min on 2 CPUs
    .venv/bin/python evals/methods.py --rows lora,controlnet
    .venv/bin/python evals/methods.py --smoke --out /tmp/EVALS.md --img-dir /tmp/img   # 2 steps, 4 prompts

Rows train under --work-dir (default outputs/evals/runs); a rerun reuses finished runs of an unchanged config
(remove the folder to start over). The figures go to EVALS.json beside EVALS.md (beside --out), so a partial
`--rows` rerun keeps the other rows as they were measured. Runs on the cluster in RAY_ADDRESS, or a local one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
ROW_NAMES = ("lora", "textual_inversion", "ti_control", "dreambooth", "controlnet", "ddpo_jpeg", "ddpo_alignment",
             "ddpo_alignment_explore", "tune", "diffusion_dpo", "reward_model", "ddpo_learned")
ALIGNMENT_PROMPTS = 256  # prompts of the pretraining split DDPO samples for the alignment reward
# Issue 19's preference rows: the base gets 98.8% of the protocol's prompts right (25 steps, guidance 5), so its
# pairs are nearly all ties. At 2 steps without guidance (the scheduler's "leading" spacing: t = 501, then 1) it
# gets 26.6%: the labeller's pairs are drawn, and the aligned models scored, there.
FEW = {"steps": 2, "guidance": 1.0}
FEW_LABEL = "2 steps, guidance 1"
# DDPO explores through each step's noise, and at FEW's spacing both steps' sigma_t are tiny (0.04, 0.02): its policy
# cannot move there. It samples, and is scored, at 2 "trailing" steps instead (from full noise: sigma_t 0.85, then
# 0.03, that last step sampled but not trained), where the base gets 62.9% of the eval's prompts right.
EXPLORE = {"steps": 2, "guidance": 1.0, "timestep_spacing": "trailing"}
EXPLORE_LABEL = "2 trailing steps, guidance 1"
DDPO_EXPLORE = ["ddpo.sample_steps=2", "ddpo.guidance=1.0", "ddpo.timestep_spacing=trailing", "ddpo.min_step_std=0.1"]
PREFERENCE_NUM = 256  # eval prompts of the preference rows (2-step renders are cheap; 64 leave +-6 points of noise)


@dataclass
class Context:
    work: Path
    num: int            # prompt/seed pairs per eval suite
    smoke: bool
    commands: list[str] = field(default_factory=list)
    trainings: list[dict] = field(default_factory=list)


@dataclass
class RowResult:
    name: str
    figures: list
    grid: Path | None
    wall_s: float
    commands: list[str]
    trainings: list[dict]


def shown(text: str) -> str:
    """A command line as a user at the repository root would type it (paths under it relative)."""
    return text.replace(f"{REPO}/", "")


def base_identity(model_path: str) -> str:
    """The base a run trains on, for its run name: the card of a pretrained model (a retrained `builtin:tiny`
    has a new one), else the path."""
    from diffray.models.loading import resolve_model_path

    card = Path(resolve_model_path(model_path)) / "diffray_model.json"
    return card.read_text() if card.is_file() else str(model_path)


def run_digest(ctx: Context, cfg) -> str:
    """A run's name tag: the resolved job and its base model's card, so a changed config (or code default) or a
    retrained base trains afresh and an unchanged one is reused. Paths under the work dir and the repository are
    written relative, so every clone names the same job alike (EVALS.md's run names hold on any machine)."""
    job = json.dumps({"config": cfg.model_dump(mode="json"), "base": base_identity(cfg.model.path)}, sort_keys=True)
    for root, tag in ((ctx.work.resolve(), "<work>"), (ctx.work, "<work>"), (REPO, "<repo>")):
        job = job.replace(str(root), tag)
    return hashlib.sha256(job.encode()).hexdigest()[:8]


def train(ctx: Context, name: str, config: str, overrides: list[str]):
    """`diffray train CONFIG overrides` into the work dir (a finished run of that name is reused)."""
    from diffray.methods import load_config
    from diffray.trainers.runner import run_training

    overrides = overrides + [f"run.storage_path={ctx.work / 'runs'}", "train.progress_bar=false"]
    if ctx.smoke:
        overrides += SMOKE.get(load_config(REPO / config, overrides).method, SMOKE_STEPS)
    cfg = load_config(REPO / config, overrides)
    overrides.append(f"run.name=eval-{name}-{run_digest(ctx, cfg)}")
    cfg = load_config(REPO / config, overrides)
    visible = [o for o in overrides if not o.startswith("train.progress_bar=")]
    ctx.commands.append(shown(f"diffray train {config} " + " ".join(shlex.quote(o) for o in visible)))
    artifact = Path(cfg.run.storage_path) / cfg.run.name / "artifact"
    if artifact.is_dir():
        from diffray.models.adapters import read_card

        card = read_card(artifact)
        print(f"  {cfg.run.name}: reusing the finished run ({artifact})", flush=True)
        ctx.trainings.append({"run": cfg.run.name, "steps": card.get("steps"), "wall_s": card.get("wall_time_s"),
                              "reused": True})
        return str(artifact)
    result = run_training(cfg)
    print(f"  {cfg.run.name}: {result.steps} steps, loss {result.loss_first_mean:.4f} -> {result.loss_last_mean:.4f}, "
          f"{result.wall_time_s:.0f}s", flush=True)
    ctx.trainings.append({"run": cfg.run.name, "steps": result.steps, "wall_s": round(result.wall_time_s, 1),
                          "loss_first": result.loss_first_mean, "loss_last": result.loss_last_mean})
    return result.artifact_dir


SMOKE_STEPS = ["train.max_steps=2", "train.checkpoint_every=2", "train.validate_every=null"]
SMOKE = {"ddpo": ["train.max_steps=1", "ddpo.samples_per_epoch=16", "train.checkpoint_every=1",
                  "train.validate_every=null"]}  # a DDPO step is a whole epoch; every other method: SMOKE_STEPS


def evaluate(ctx: Context, row: str, suite: str, num: int | None = None, **kwargs):
    """`diffray eval --suite SUITE ...` (report under the work dir) -> EvalResult."""
    from diffray.world.evaluate import evaluate as run_eval

    num = ctx.num if ctx.smoke or num is None else max(num, ctx.num)
    flags = " ".join((f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else
                      f"--{k.replace('_', '-')} {v}") for k, v in kwargs.items() if v is not None)
    ctx.commands.append(shown(f"diffray eval --suite {suite} --num {num} {flags}".rstrip()))
    result = run_eval(suite=suite, num=num, out_dir=ctx.work / "eval" / row / suite, **kwargs)
    # every field right; and for a shape concept the shape alone, which is that row's figure
    fields = ("all", "shape") if suite in ("star", "triangle") else ("all",)
    shown_acc = lambda v: ", ".join(f"{f} {a:.1%}" for f in fields
                                    if (a := result.tables[v].get(f, {}).get("accuracy")) is not None)
    print(f"  eval {suite}: {'; '.join(f'{v} {shown_acc(v)}'.rstrip() for v in result.variants)} "
          f"({result.wall_s:.0f}s)", flush=True)
    return result


def grid_of(ctx: Context, row: str, suite: str) -> Path:
    return ctx.work / "eval" / row / suite / "grid.png"


# ----------------------------------------------------------------------------------------------- the rows

def row_lora(ctx: Context, key: str, label: str, extra: list[str]):
    """The star LoRA of `make demo` (configs/demo.yaml): the reserved shape drawn, the base's prompts kept."""
    from diffray.world.figures import concept_figures

    art = train(ctx, key, "configs/demo.yaml", extra)
    star, prompts = evaluate(ctx, key, "star", adapter=art), evaluate(ctx, key, "prompts", adapter=art)
    return concept_figures("LoRA" + label, star, prompts), grid_of(ctx, key, "star")


def row_textual_inversion(ctx: Context, key: str, label: str, extra: list[str]):
    """configs/textual_inversion.yaml pointed at the star set: the token <star> draws the reserved shape."""
    from diffray.world.figures import concept_figures

    art = train(ctx, key, "configs/textual_inversion.yaml", [
        "data.path=builtin:world/star", "textual_inversion.placeholder_token=<star>",
        "textual_inversion.initializer_token=diamond"] + extra)
    star, prompts = evaluate(ctx, key, "star", adapter=art), evaluate(ctx, key, "prompts", adapter=art)
    return (concept_figures("Textual Inversion" + label, star, prompts, trained_min=0.5, identical=True),
            grid_of(ctx, key, "star"))


def row_ti_control(ctx: Context, key: str, label: str, extra: list[str]):
    """Textual Inversion where the base can draw the concept: triangles learned as <tri> from the world set's own
    captions ('triangle' swapped for the token), the token starting as 'circle'. Before training the token feeds
    the model exactly what 'circle' does, so the start is scored with 'circle' in its place."""
    from diffray.world.figures import token_figures

    art = train(ctx, key, "configs/textual_inversion.yaml", [
        "data.path=builtin:world/triangle", "textual_inversion.placeholder_token=<tri>",
        "textual_inversion.initializer_token=circle", "textual_inversion.captions=dataset",
        "textual_inversion.concept_word=triangle"] + extra)
    start = evaluate(ctx, f"{key}-start", "triangle", adapter=art, token="circle", compare_base=False)
    trained = evaluate(ctx, key, "triangle", adapter=art)
    return token_figures("Textual Inversion, control" + label, start, trained), grid_of(ctx, key, "triangle")


def row_dreambooth(ctx: Context, key: str, label: str, extra: list[str]):
    """configs/dreambooth.yaml as shipped, and again without prior preservation."""
    from diffray.world.figures import dreambooth_figures

    with_prior = train(ctx, key, "configs/dreambooth.yaml", extra)
    without = train(ctx, f"{key}-no-prior", "configs/dreambooth.yaml",
                    extra + ["dreambooth.with_prior_preservation=false"])
    a = evaluate(ctx, key, "subject", adapter=with_prior)
    b = evaluate(ctx, f"{key}-no-prior", "subject", adapter=without)
    return dreambooth_figures("DreamBooth" + label, a, b), grid_of(ctx, key, "subject")


def row_controlnet(ctx: Context, key: str, label: str, extra: list[str]):
    from diffray.world.figures import controlnet_figures

    art = train(ctx, key, "configs/controlnet.yaml", extra)
    result = evaluate(ctx, key, "controlnet", controlnet=art)
    return controlnet_figures("ControlNet (canny)" + label, result), grid_of(ctx, key, "controlnet")


def row_ddpo_jpeg(ctx: Context, key: str, label: str, extra: list[str]):
    from diffray.world.figures import jpeg_figures

    art = train(ctx, key, "configs/ddpo.yaml", extra)
    result = evaluate(ctx, key, "prompts", adapter=art)
    return jpeg_figures("DDPO, jpeg_compressibility" + label, result), grid_of(ctx, key, "prompts")


def alignment_prompts(path: Path) -> Path:
    """ALIGNMENT_PROMPTS captions of the pretraining split (the eval's held-out prompts are other scenes)."""
    from diffray.world.scenes import scene_at

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(scene_at(0, "pretrain", i).caption + "\n" for i in range(ALIGNMENT_PROMPTS)))
    return path


def row_ddpo_alignment(ctx: Context, key: str, label: str, extra: list[str]):
    from diffray.world.figures import alignment_figures

    prompts = alignment_prompts(ctx.work / "alignment_prompts.txt")
    art = train(ctx, key, "configs/ddpo.yaml", [
        "ddpo.reward.name=world_alignment", f"ddpo.prompts_file={prompts}"] + extra)
    result = evaluate(ctx, key, "prompts", adapter=art)
    return alignment_figures("DDPO, world_alignment" + label, result), grid_of(ctx, key, "prompts")


def row_ddpo_alignment_explore(ctx: Context, key: str, label: str, extra: list[str]):
    """configs/ddpo.yaml with the reader's reward where the base errs and DDPO can explore (EXPLORE), scored the
    same way: issue 17's alignment floor (+10 points) where there is room for it. Groups of 4 and kl_coef 0.1 as
    the learned reward's row, 40 epochs."""
    from diffray.world.figures import preference_figures

    prompts = alignment_prompts(ctx.work / "alignment_prompts.txt")
    art = train(ctx, key, "configs/ddpo.yaml", [
        "ddpo.reward.name=world_alignment", f"ddpo.prompts_file={prompts}", *DDPO_EXPLORE,
        "ddpo.images_per_prompt=4", "ddpo.kl_coef=0.1", "train.max_steps=40"] + extra)
    few = evaluate(ctx, key, "prompts", num=PREFERENCE_NUM, adapter=art, **EXPLORE)
    return (preference_figures("DDPO, world_alignment, " + EXPLORE_LABEL + label, few, None, EXPLORE_LABEL),
            grid_of(ctx, key, "prompts"))


def row_tune(ctx: Context, key: str, label: str, extra: list[str]):
    """configs/tune_lora.yaml's grid, every trial to the end (FIFO: a trial ASHA stops has no adapter to score,
    only its final checkpoint carries one): each trial's adapter on the prompts suite, against its val_loss."""
    from diffray.tune.config import load_tune_job
    from diffray.tune.runner import run_tune
    from diffray.world.figures import tune_figures

    overrides = ["run.name=eval-tune", f"run.storage_path={ctx.work / 'runs'}", "tune.scheduler.name=fifo",
                 "train.progress_bar=false"]
    if ctx.smoke:
        overrides += ["train.max_steps=2", "train.validate_every=1", "train.checkpoint_every=2",
                      "tune.space={lora.rank: {grid: [4, 8]}, optim.lr: {grid: [3.0e-4]}, "
                      "lora.alpha: {same_as: lora.rank}}"]
    ctx.commands.append(shown("diffray tune configs/tune_lora.yaml " + " ".join(
        shlex.quote(o) for o in overrides if not o.startswith("train.progress_bar="))))
    job = load_tune_job(str(REPO / "configs" / "tune_lora.yaml"), overrides)
    t0 = time.time()
    outcome = run_tune(job)
    ctx.trainings.append({"run": "eval-tune", "trials": len(outcome.rows), "wall_s": round(time.time() - t0, 1)})
    trials = []
    for r in outcome.rows:
        if not r.checkpoint_path or not Path(f"{r.checkpoint_path}/artifact").is_dir():
            continue
        res = evaluate(ctx, f"tune/{r.trial_id}", "prompts", adapter=f"{r.checkpoint_path}/artifact",
                       compare_base=False)
        trials.append({"trial_id": r.trial_id, "params": r.params, "val_loss": r.best_metric, "steps": r.steps,
                       "accuracy": res.accuracy(res.variants[-1], "all") or 0.0})
    best = evaluate(ctx, "tune", "prompts", adapter=outcome.best_artifact)
    figs = tune_figures("Tune (grid, every trial to the end)", trials, best.accuracy(best.variants[-1], "all") or 0.0)
    for t in trials:
        print(f"  trial {t['trial_id']} {t['params']} steps {t['steps']} val_loss {t['val_loss']:.5f} "
              f"accuracy {t['accuracy']:.1%}", flush=True)
    ctx.trainings[-1]["trial_table"] = trials
    return figs, grid_of(ctx, "tune", "prompts")


def world_pairs(ctx: Context, name: str, seed: int, num: int) -> Path:
    """`diffray data world-pairs` at FEW (4 images per prompt: a right and a wrong one when the prompt has both),
    drawn once into the work dir."""
    from diffray.world.labeller import label_pairs

    num = 16 if ctx.smoke else num
    out = ctx.work / f"pairs-{name}-seed{seed}-{num}.parquet"
    ctx.commands.append(f"diffray data world-pairs {shown(str(out))} --num {num} --seed {seed} --steps {FEW['steps']} "
                        f"--guidance {FEW['guidance']} --images-per-prompt 4")
    if not out.is_file():  # label_pairs writes the file whole or not at all
        c = label_pairs(out, num=num, seed=seed, images_per_prompt=4, **FEW)
        print(f"  pairs {name}: {c['first'] + c['second']} of {c['pairs']} with a preference, {c['accuracy']:.1%} of "
              f"the images right", flush=True)
    return out


def pair_overrides(pairs: Path, steps: int) -> list[str]:
    return [f"data.path={pairs}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
            "train.validate_every=100"]


def row_diffusion_dpo(ctx: Context, key: str, label: str, extra: list[str]):
    """configs/diffusion_dpo.yaml on 1,000 labeller pairs of the base's own 2-step images (seed 1), scored on
    the eval's prompts (seed 0) sampled the same way, and at the protocol."""
    from diffray.world.figures import preference_figures

    pairs = world_pairs(ctx, "train", 1, 1000)
    art = train(ctx, key, "configs/diffusion_dpo.yaml", pair_overrides(pairs, 300) + extra)
    few = evaluate(ctx, key, "prompts", num=PREFERENCE_NUM, adapter=art, **FEW)
    protocol = evaluate(ctx, f"{key}-protocol", "prompts", num=PREFERENCE_NUM, adapter=art)
    return preference_figures("Diffusion-DPO" + label, few, protocol, FEW_LABEL), grid_of(ctx, key, "prompts")


def reward_artifact(ctx: Context) -> str:
    pairs = world_pairs(ctx, "train", 1, 1000)
    return train(ctx, "reward_model", "configs/reward_model.yaml", pair_overrides(pairs, 400))


def row_reward_model(ctx: Context, key: str, label: str, extra: list[str]):
    """configs/reward_model.yaml on the same pairs; ranked on 500 prompts' pairs of another suite seed (2)."""
    from diffray.models.reward import rank_pairs
    from diffray.world.figures import pairwise_figure

    art, held = reward_artifact(ctx), world_pairs(ctx, "held", 2, 500)
    ctx.commands.append(f"diffray data rank-pairs {shown(str(held))} --reward {shown(art)}")
    return [pairwise_figure("Reward model (Bradley-Terry)" + label, rank_pairs(art, str(held)))], None


def row_ddpo_learned(ctx: Context, key: str, label: str, extra: list[str]):
    """configs/ddpo.yaml scored by the learned reward on the alignment prompts, sampled and scored where DDPO can
    explore (EXPLORE): each prompt drawn in groups of 4 (the reward's per-prompt offsets cancel) and kl_coef 0.1
    (the policy held near the base, where the reward model ranks images as the reader does)."""
    from diffray.world.figures import preference_figures

    reward, prompts = reward_artifact(ctx), alignment_prompts(ctx.work / "alignment_prompts.txt")
    art = train(ctx, key, "configs/ddpo.yaml", [
        "ddpo.reward.name=learned", f"ddpo.reward.options={{path: {reward}}}", f"ddpo.prompts_file={prompts}",
        *DDPO_EXPLORE, "ddpo.images_per_prompt=4", "ddpo.kl_coef=0.1"] + extra)
    few = evaluate(ctx, key, "prompts", num=PREFERENCE_NUM, adapter=art, **EXPLORE)
    return (preference_figures("DDPO, learned reward" + label, few, None, EXPLORE_LABEL, None),
            grid_of(ctx, key, "prompts"))


# Override pairs several variants share (kept first, in this order, so the printed commands and run digests stay).
PUBLISHED_DDPO = ["ddpo.min_step_std=0", "ddpo.kl_coef=0"]  # every sampled step trained, no KL: DDPO as published
OVER_THE_BATCH = ["ddpo.images_per_prompt=1", "ddpo.kl_coef=0"]  # advantages over the batch, no KL: as first measured

# Settings measured beside each shipped config (the investigation of a missed floor, rerun by `make eval`):
# row -> [(key, label, overrides)]. Each trains its own run and is scored with the row's suites and figures.
VARIANTS: dict[str, list[tuple[str, str, list[str]]]] = {
    "lora": [
        ("lora-mix600", " (star_mix, 600 steps)", ["data.path=builtin:world/star_mix", "train.max_steps=600",
                                                   "train.checkpoint_every=300", "train.validate_every=null"]),
        ("lora-mix1600", " (star_mix, 1600 steps)", ["data.path=builtin:world/star_mix", "train.max_steps=1600",
                                                     "train.checkpoint_every=800", "train.validate_every=null"])],
    "textual_inversion": [
        ("ti-400", " (400 steps of 8, lr 5e-3)", ["train.max_steps=400", "train.micro_batch_size=8", "optim.lr=5e-3",
                                                  "train.checkpoint_every=200", "train.validate_every=null"]),
        ("ti-captions", " (the set's own captions, 'star' as <star>)", ["textual_inversion.captions=dataset",
                                                                      "textual_inversion.concept_word=star"])],
    "ti_control": [
        ("ti-control-templates", " (the object templates, 'a photo of a <tri>', as shipped)", [
            "textual_inversion.captions=templates", "textual_inversion.concept_word=null"])],
    "controlnet": [
        ("controlnet-all-t", " (every timestep, as before: train.timestep_range=null)", ["train.timestep_range=null"])],
    "ddpo_jpeg": [
        ("ddpo-jpeg-seed1", " (run.seed=1)", ["run.seed=1"]),
        ("ddpo-jpeg-kl05", " (kl_coef 0.05)", ["ddpo.kl_coef=0.05"]),
        ("ddpo-jpeg-nokl", " (no KL: kl_coef 0)", ["ddpo.kl_coef=0"]),
        ("ddpo-jpeg-nokl-e10", " (no KL, 10 epochs)", ["ddpo.kl_coef=0", "train.max_steps=10"]),
        ("ddpo-jpeg-s10", " (10 sampling steps: trained down to t = 201)", ["ddpo.sample_steps=10"]),
        ("ddpo-jpeg-every-step", " (every step trained, no KL: the config before)", PUBLISHED_DDPO),
        ("ddpo-lr3e-3", " (every step trained, no KL, lr 3e-3, 30 epochs)", [
            *PUBLISHED_DDPO, "optim.lr=3e-3", "train.max_steps=30"]),
        ("ddpo-cfg", " (every step trained, no KL, 15 epochs sampled as evaluated: 10 steps, guidance 5)", [
            *PUBLISHED_DDPO, "train.max_steps=15", "ddpo.sample_steps=10",
            "ddpo.guidance=5.0"])],
    "diffusion_dpo": [
        ("dpo-beta5000", " (beta 5000: the paper's, the schema's default)", ["dpo.beta=5000"])],
    "ddpo_learned": [
        ("ddpo-learned-seed1", " (run.seed=1)", ["run.seed=1"]),
        ("ddpo-learned-nokl", " (kl_coef 0: the policy finds what the reward model misjudges)", ["ddpo.kl_coef=0"]),
        ("ddpo-learned-every-step", " (every step trained: min_step_std 0)", ["ddpo.min_step_std=0"]),
        ("ddpo-learned-leading", " (sampled at FEW's leading 2 steps, every step trained: as before)", [
            "ddpo.timestep_spacing=null", "ddpo.min_step_std=0"]),
        ("ddpo-world-explore", " (the world_alignment reward instead: the reader itself)", [
            "ddpo.reward.name=world_alignment", "ddpo.reward.options={}"])],
    "ddpo_alignment_explore": [
        ("align-explore-main-seed1", " (run.seed=1)", ["run.seed=1"]),
        ("align-explore-g4-kl", " (20 epochs)", ["train.max_steps=20"]),
        ("align-explore-plain", " (over the batch, no KL, 20 epochs: as first measured)", [
            *OVER_THE_BATCH, "train.max_steps=20"]),
        ("align-explore-seed1", " (over the batch, no KL, 20 epochs, run.seed=1)", [
            *OVER_THE_BATCH, "train.max_steps=20", "run.seed=1"]),
        ("align-explore-every-step", " (over the batch, no KL, 20 epochs, every step trained)", [
            *OVER_THE_BATCH, "train.max_steps=20", "ddpo.min_step_std=0"]),
        ("align-explore-40", " (over the batch, no KL, 40 epochs)", OVER_THE_BATCH),
        ("align-explore-80", " (over the batch, no KL, 80 epochs)", [
            *OVER_THE_BATCH, "train.max_steps=80"])],
    "ddpo_alignment": [
        ("align-cfg", " (lr 1e-3, 15 epochs sampled as evaluated: 10 steps, guidance 5)", [
            "optim.lr=1e-3", "train.max_steps=15", "ddpo.sample_steps=10", "ddpo.guidance=5.0"])],
}

ROWS: dict[str, Callable] = {"lora": row_lora, "textual_inversion": row_textual_inversion, "ti_control": row_ti_control,
                             "dreambooth": row_dreambooth, "controlnet": row_controlnet, "ddpo_jpeg": row_ddpo_jpeg,
                             "ddpo_alignment": row_ddpo_alignment,
                             "ddpo_alignment_explore": row_ddpo_alignment_explore, "tune": row_tune,
                             "diffusion_dpo": row_diffusion_dpo, "reward_model": row_reward_model,
                             "ddpo_learned": row_ddpo_learned}


def compact_png(src: Path, dest: Path) -> None:
    """The grid as a 128-colour palette PNG (flat world colours survive; a tenth of the bytes) for the repo."""
    from PIL import Image

    Image.open(src).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(dest, optimize=True)


def run_row(name: str, ctx: Context, img_dir: Path, variants: bool) -> RowResult:
    ctx.commands, ctx.trainings = [], []
    t0 = time.time()
    figures, grid = ROWS[name](ctx, name, "", [])
    for key, label, extra in VARIANTS.get(name, []) if variants else []:
        figures += ROWS[name](ctx, key, label, extra)[0]
    dest = None
    if grid is not None and grid.is_file():
        img_dir.mkdir(parents=True, exist_ok=True)
        dest = img_dir / f"{name}.png"
        compact_png(grid, dest)
    return RowResult(name, figures, dest, time.time() - t0, list(ctx.commands), list(ctx.trainings))


def record_path(out: Path) -> Path:
    """The figures behind a markdown report, as JSON beside it (EVALS.json for EVALS.md, committed with it)."""
    return out.with_suffix(".json")


def earlier_results(record: Path, img_dir: Path, skip: list[str]) -> list[RowResult]:
    """The rows of the last `record` (see `record_path`) that are not rerun now: a partial `--rows` rerun keeps
    them in EVALS.md as they were measured, on a fresh clone too (the work dir is not needed)."""
    from diffray.world.figures import Figure

    out = []
    for r in json.loads(record.read_text()) if record.is_file() else []:
        if r["row"] in ROWS and r["row"] not in skip:
            grid = img_dir / f"{r['row']}.png"
            out.append(RowResult(r["row"], [Figure(**f) for f in r["figures"]], grid if grid.is_file() else None,
                                 r["wall_s"], r["commands"], r["trainings"]))
    return out


def table(results: list[RowResult]) -> list[str]:
    lines = ["| method | figure | base | trained | floor | met |", "|---|---|---:|---:|---|:-:|"]
    for res in results:
        for f in res.figures:
            lines.append(f"| {f.row} | {f.name} | {f.base} | {f.trained} | {f.floor} | "
                         f"{'-' if f.met is None else 'yes' if f.met else '**no**'} |")
    return lines


def write_markdown(results: list[RowResult], out: Path, argv: list[str], total_s: float,
                   rerun: list[str] | None = None) -> None:
    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, out.parent.resolve())).as_posix()

    reuse = (" (a training of an unchanged config already under the work dir, from an earlier row of this run "
             "or an earlier run, is reused: each run's own training time is listed under its method)") if any(
        t.get("reused") for r in results for t in r.trainings) else ""
    scope = f" for the rows {', '.join(rerun)}; the other rows are as an earlier run measured them" if rerun else ""
    parts = ["# EVALS: what each method learns on the tiny world", "",
             "Written by `make eval` (`" + " ".join(["python evals/methods.py"] + argv) + "`); "
             f"{total_s / 60:.1f} min on this machine{reuse}{scope}. Base model `builtin:tiny` (the pretrained world "
             "model), the shipped configs (overrides as listed), `diffray eval`'s protocol (stock "
             "StableDiffusionPipeline, 25 steps, guidance 5, 64x64, seeded per prompt, suite seed 0; the preference rows "
             f"also at {FEW_LABEL}, where the base errs, and the DDPO rows that align prompts at {EXPLORE_LABEL}, "
             "where it errs and DDPO can explore), the world reader scoring every image. "
             "Reruns with the same seeds give the same figures up to the last bits of float sums "
             "(CPU thread scheduling).", ""] + table(results) + [""]
    for res in results:
        parts += [f"## {res.figures[0].row if res.figures else res.name}", "",
                  f"Wall time {res.wall_s:.0f} s (training and eval). Commands:", "", "```"]
        parts += res.commands + ["```", ""]
        for t in res.trainings:
            t = {k: v for k, v in t.items() if k != "trial_table"}
            parts.append("- " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) and k.startswith("loss")
                                          else f"{k} {v}" for k, v in t.items()))
        if res.grid is not None:
            parts += ["", f"![{res.name}]({rel(res.grid)}) (frames: green = every stated field right, red = some "
                      "wrong, grey = nothing to check; base rows first)"]
        parts.append("")
    out.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROW_NAMES), help=f"comma-separated: {', '.join(ROW_NAMES)}")
    p.add_argument("--num", type=int, default=None, help="prompt/seed pairs per suite (default 64; smoke 4)")
    p.add_argument("--smoke", action="store_true", help="2 steps per method, 4 prompts: the machinery only")
    p.add_argument("--no-variants", action="store_true", help="only the shipped configs, not the settings "
                   "measured beside them (VARIANTS)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its floor")
    p.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "evals")
    p.add_argument("--out", type=Path, default=REPO / "EVALS.md")
    p.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img" / "evals")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)} (allowed: {', '.join(ROW_NAMES)})")
    from diffray import logs
    from diffray.cluster import connect_ray

    logs.configure_cli(logs.verbose())  # as `diffray ...` does: Ray's, Tune's and DeepSpeed's output to log files
    connect_ray()
    ctx = Context(args.work_dir.resolve(), args.num or (4 if args.smoke else 64), args.smoke)
    record = record_path(args.out)
    t0, results, kept = time.time(), [], earlier_results(record, args.img_dir, rows)
    for name in rows:
        print(f"{name}:", flush=True)
        results.append(run_row(name, ctx, args.img_dir, not (args.smoke or args.no_variants)))
        every = sorted(kept + results, key=lambda r: ROW_NAMES.index(r.name))
        # a partial table survives a later failure
        write_markdown(every, args.out, argv, time.time() - t0, rows if kept else None)
        record.write_text(json.dumps(
            [{"row": r.name, "wall_s": r.wall_s, "figures": [f.to_json() for f in r.figures],
              "trainings": r.trainings, "commands": r.commands} for r in every], indent=2) + "\n")
    print("\n".join(table(results)))
    print(f"wrote {args.out} ({(time.time() - t0) / 60:.1f} min)")
    missed = [f"{f.row}: {f.name}" for r in results for f in r.figures if f.met is False]
    if missed:
        print(f"{len(missed)} figure(s) below their floor: " + "; ".join(missed))
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
