"""DreamBooth: teach the model a subject from a few instance images, with prior preservation.

Driver side (`preflight`, `dataset_sources`): the instance images are checked before anything starts;
missing class images are generated with the base model as a Ray Data batch-inference job (an actor
pool over the cluster, a GPU each when `scaling.use_gpu`), written to a class folder keyed by model,
prompt and sampler settings, and reused by every later run. Worker side (`DreamBoothTask` in the
shared loop): each micro-batch is `micro_batch_size` instance rows followed by as many class rows;
the loss is instance loss + `prior_loss_weight` x class loss. `mode: lora` trains a LoRA adapter
(artifact as for LoRA); `mode: full` fine-tunes every UNet weight (ZeRO-2/3 shards it) and exports a
full pipeline directory that `StableDiffusionPipeline.from_pretrained` loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import torch

from diffray.config import DreamBoothTrainConfig
from diffray.models.adapters import export_lora, write_card
from diffray.paths import cache_dir
from diffray.trainers import session
from diffray.trainers.lora import LoraDenoiser, LoraTask, denoising_losses
from diffray.trainers.loop import render_prompts, run_worker

CLASS_ID_OFFSET = 1_000_000  # class rows' sample ids start here (distinct noise keys from instance rows)
GENERATED_FILE = "generated.json"


# ---------------------------------------------------------------------------------------------- driver


def preflight(cfg: DreamBoothTrainConfig, model_path: str) -> None:
    """Every instance image decodes (there are only a few): otherwise one error naming the files."""
    from diffray.data import resolve_data_path
    from diffray.data.imagefolder import check_concept_images

    check_concept_images(resolve_data_path(cfg.data.path), cfg.data.caption_column, cfg.data.image_column,
                         cfg.dreambooth.instance_prompt, cfg.train.micro_batch_size, "instance images")


def class_dir_for(cfg: DreamBoothTrainConfig, model_path: str) -> Path:
    """The configured class folder, or a cache folder keyed by everything that changes the images."""
    db = cfg.dreambooth
    if db.class_data_dir:
        return Path(db.class_data_dir).expanduser().resolve()
    key = json.dumps({"model": cfg.model.path, "model_path": model_path, "prompt": db.class_prompt,
                      "resolution": cfg.data.resolution, "steps": db.class_inference_steps,
                      "guidance": db.class_guidance_scale, "seed": cfg.run.seed}, sort_keys=True)
    return cache_dir() / "class-images" / hashlib.sha256(key.encode()).hexdigest()[:16]


class ClassImageGenerator:
    """Ray Data actor: the base pipeline, loaded once; a batch of indices -> PNG bytes.

    Image i is drawn with seed (run seed, i), so the set does not depend on batching or actor count.
    """

    def __init__(self, model_path: str, prompt: str, resolution: int, steps: int, guidance: float, seed: int,
                 use_gpu: bool):
        from diffray.models.loading import load_pipeline

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.pipe = load_pipeline(model_path, dtype=dtype, device=self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt, self.resolution, self.steps, self.guidance, self.seed = prompt, resolution, steps, guidance, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = [int(i) for i in batch["index"]]
        gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in index]
        images = self.pipe([self.prompt] * len(index), height=self.resolution, width=self.resolution,
                           num_inference_steps=self.steps, guidance_scale=self.guidance, generator=gens).images
        png = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            png.append(buf.getvalue())
        return {"index": np.asarray(index, dtype=np.int64), "png": np.array(png, dtype=object)}


def ensure_class_images(cfg: DreamBoothTrainConfig, model_path: str) -> tuple[Path, int]:
    """The class folder, filled up to `num_class_images`; returns (folder, images generated now).

    Existing images (generated earlier or the user's own) are kept and counted; each new image is
    written atomically and `metadata.jsonl` is rewritten last, so an interrupted job resumes.
    """
    from diffray.data.imagefolder import IMAGE_SUFFIXES

    db, s = cfg.dreambooth, cfg.scaling
    out = class_dir_for(cfg, model_path)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = db.num_class_images - len(existing)
    generated = 0
    if missing > 0:
        start = max([int(n.split(".")[0]) for n in existing if n.split(".")[0].isdigit()] + [-1]) + 1
        ds = ray.data.range(missing).map(lambda r: {"index": r["id"] + start})
        ds = ds.map_batches(
            ClassImageGenerator, batch_size=db.class_batch_size, batch_format="numpy",
            fn_constructor_kwargs={"model_path": model_path, "prompt": db.class_prompt,
                                   "resolution": cfg.data.resolution, "steps": db.class_inference_steps,
                                   "guidance": db.class_guidance_scale, "seed": cfg.run.seed, "use_gpu": s.use_gpu},
            concurrency=(1, max(1, min(s.num_workers, -(-missing // db.class_batch_size)))),
            num_cpus=s.cpus_per_worker, num_gpus=1 if s.use_gpu else 0)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, data in zip(batch["index"], batch["png"]):
                tmp = out / f".{int(i):05d}.png.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, out / f"{int(i):05d}.png")
                generated += 1
        existing = sorted(p.name for p in out.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    meta = "".join(json.dumps({"file_name": n, "text": db.class_prompt}) + "\n" for n in existing)
    if not (out / "metadata.jsonl").is_file() or (out / "metadata.jsonl").read_text() != meta:
        tmp = out / ".metadata.jsonl.tmp"
        tmp.write_text(meta)
        os.replace(tmp, out / "metadata.jsonl")
    if generated:
        record = json.loads((out / GENERATED_FILE).read_text()) if (out / GENERATED_FILE).is_file() else {}
        record = {"prompt": db.class_prompt, "model": cfg.model.path, "generated": record.get("generated", 0) + generated}
        (out / GENERATED_FILE).write_text(json.dumps(record) + "\n")
    return out, generated


def dataset_sources(cfg: DreamBoothTrainConfig, model_path: str) -> dict:
    """{"train": the instance images, "class": the class images (with prior preservation; generated
    first when short)}, each captioned by its prompt."""
    from diffray.data import resolve_data_path
    from diffray.trainers.runner import DataSource

    db = cfg.dreambooth
    sources = {"train": DataSource(resolve_data_path(cfg.data.path), db.instance_prompt)}
    if db.with_prior_preservation:
        class_dir, _ = ensure_class_images(cfg, model_path)
        sources["class"] = DataSource(str(class_dir), db.class_prompt, CLASS_ID_OFFSET)
    return sources


# ---------------------------------------------------------------------------------------------- worker


def build_model(cfg: DreamBoothTrainConfig, comps) -> LoraDenoiser:
    """LoRA mode: frozen base + adapters (as the LoRA trainer). Full mode: every UNet weight trains."""
    if cfg.dreambooth.mode == "lora":
        from diffray.trainers.lora import build_model as build_lora

        return build_lora(cfg, comps)
    comps.unet.requires_grad_(True)
    comps.text_encoder.requires_grad_(cfg.dreambooth.train_text_encoder)
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    return LoraDenoiser(comps.unet, comps.text_encoder if cfg.dreambooth.train_text_encoder else None)


def dreambooth_loss(engine, comps, instance: dict, klass: dict | None, step: int, cfg: DreamBoothTrainConfig,
                    env: session.WorkerEnv, prediction_type: str, empty: dict | None = None) -> torch.Tensor:
    """Instance loss + prior_loss_weight x class loss, both rows in one forward pass."""
    batch = instance if klass is None else {k: torch.cat([instance[k], klass[k]]) for k in instance}
    losses = denoising_losses(engine, comps, batch, step, cfg, env, prediction_type, cfg.trains_text_encoder, empty)
    n = len(instance["sample_id"])
    loss = losses[:n].mean()
    if klass is not None:
        loss = loss + cfg.dreambooth.prior_loss_weight * losses[n:].mean()
    return loss


def export_pipeline(out_dir: Path, comps, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                    card: dict[str, Any]) -> Path:
    """A full diffusers pipeline dir (safetensors) with the fine-tuned UNet (and text encoder)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=text_encoder, tokenizer=comps.tokenizer, unet=unet,
                                   scheduler=comps.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_card(out_dir, card)
    return out_dir


class DreamBoothTask(LoraTask):
    """DreamBooth in the shared loop (see `diffray.trainers.loop.Task`): LoRA's set-up with its own
    model, two data streams, the prior-preservation loss, its validation rows and artifact."""

    instances = classes = None

    @staticmethod
    def build_model(cfg, comps) -> LoraDenoiser:
        return build_model(cfg, comps)

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.trains_text_encoder

    def start(self, engine, skip_micro_batches: int) -> None:
        self.instances = session.data_stream("train", self.cfg, self.env, skip_micro_batches)
        if self.cfg.dreambooth.with_prior_preservation:
            self.classes = session.data_stream("class", self.cfg, self.env, skip_micro_batches)

    def loss(self, engine, step: int) -> torch.Tensor:
        klass = next(self.classes) if self.classes is not None else None
        return dreambooth_loss(engine, self.comps, next(self.instances), klass, step, self.cfg, self.env,
                               self.prediction_type, self.empty)

    def validation_grid(self, step: int):
        """Row 1: the instance prompt; row 2: the class prompt (language drift); then extra prompts."""
        from diffray.images import make_grid

        db, t = self.cfg.dreambooth, self.cfg.train
        te = self.module.text_encoder or self.comps.text_encoder
        rows = [render_prompts(self.comps, self.module.unet, te, [p, p], t.validation_inference_steps,
                               self.cfg.run.seed) for p in (db.instance_prompt, db.class_prompt)]
        if t.validation_prompts:
            rows.append(render_prompts(self.comps, self.module.unet, te, t.validation_prompts,
                                       t.validation_inference_steps, self.cfg.run.seed))
        return make_grid(rows)

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        card = {**card, "instance_prompt": self.cfg.dreambooth.instance_prompt,
                "class_prompt": self.cfg.dreambooth.class_prompt, "mode": self.cfg.dreambooth.mode}
        if self.cfg.dreambooth.mode == "lora":
            return export_lora(out_dir, self.module.unet, self.module.text_encoder, card)
        return export_pipeline(out_dir, self.comps, self.module.unet, self.module.text_encoder or self.comps.text_encoder,
                               card)


def train_loop_per_worker(config: dict) -> None:
    run_worker(config, DreamBoothTrainConfig, DreamBoothTask)
