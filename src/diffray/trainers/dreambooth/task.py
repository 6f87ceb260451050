"""DreamBooth on the shared denoising base: LoRA or every UNet weight trains; each step's micro-batch is
instance rows plus as many class rows in one forward pass, the loss split per sample; every step logs the
instance and class losses and row counts apart (`instance_loss`, `class_loss`, `class_rows`), counted from
the sample ids of the rows that reached the forward pass; validation rows show the instance prompt and the
class prompt (language drift); the artifact is a LoRA or a pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffray.models.adapters import export_lora
from diffray.trainers import session
from diffray.trainers.components.diffusion import batch_mean
from diffray.trainers.denoising import (DenoisingTask, Denoiser, export_non_ema, export_pipeline, full_denoiser,
                                        lora_denoiser)
from diffray.trainers.dreambooth.class_images import CLASS_ID_OFFSET


class DreamBoothTask(DenoisingTask):
    """DreamBooth in the shared loop."""

    def __init__(self, cfg, model_path: str, env: session.WorkerEnv):
        super().__init__(cfg, model_path, env)
        self.sums = torch.zeros(4, dtype=torch.float64)  # this step's instance loss, rows, class loss, rows

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.trains_text_encoder

    @property
    def datasets(self) -> tuple[str, ...]:
        return ("train", "class") if self.cfg.dreambooth.with_prior_preservation else ("train",)

    def build_module(self) -> Denoiser:
        """LoRA mode: frozen base + adapters (as the LoRA method). Full mode: every UNet weight trains."""
        cfg = self.cfg
        if cfg.dreambooth.mode == "lora":
            return lora_denoiser(self.comps, cfg.lora, cfg.run.seed, cfg.train.gradient_checkpointing)
        return full_denoiser(self.comps, cfg.dreambooth.train_text_encoder, cfg.train.gradient_checkpointing)

    def loss(self, engine, step: int) -> torch.Tensor:
        klass = self.next_batch("class") if "class" in self.streams else None
        return self.prior_loss(engine, self.next_batch("train"), klass, step)

    def prior_loss(self, engine, instance: dict, klass: dict | None, step: int) -> torch.Tensor:
        """Instance loss + prior_loss_weight x class loss, both rows in one forward pass."""
        if klass is not None and "loss_mask" in instance and "loss_mask" not in klass:  # class rows: every pixel
            klass = {**klass, "loss_mask": torch.ones((len(klass["sample_id"]), *instance["loss_mask"].shape[1:]))}
        batch = instance if klass is None else {k: torch.cat([instance[k], klass[k]]) for k in instance}
        losses = self.losses(engine, batch, step)
        n = len(instance["sample_id"])
        mask = instance.get("loss_mask")
        loss = batch_mean(losses[:n], mask)
        if klass is not None:
            loss = loss + self.cfg.dreambooth.prior_loss_weight * losses[n:].mean()
        self.tally(batch["sample_id"], losses.detach())
        return loss

    def tally(self, sample_ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Add a micro-batch's per-row losses to this step's instance/class sums. A row is a class row
        by its sample id (class ids start at CLASS_ID_OFFSET), so the counts say what the forward saw."""
        is_class = (sample_ids >= CLASS_ID_OFFSET).to(losses.device)
        sums = torch.stack([losses[~is_class].sum(), (~is_class).sum(), losses[is_class].sum(), is_class.sum()])
        self.sums = self.sums + sums.double().cpu()

    def train_step(self, engine, step: int) -> session.StepOutput:
        """The shared step, with the instance and class losses (means over every rank's rows of the step)
        and the rows of each kind in its metrics."""
        self.sums = torch.zeros(4, dtype=torch.float64)
        out = super().train_step(engine, step)
        inst_sum, inst_n, cls_sum, cls_n = session.global_sum(self.sums).tolist()  # one collective, not four
        metrics = {"instance_loss": inst_sum / max(inst_n, 1), "instance_rows": round(inst_n)}
        if "class" in self.streams:
            metrics.update(class_loss=cls_sum / cls_n if cls_n else float("nan"), class_rows=round(cls_n))
        return replace(out, metrics={**out.metrics, **metrics})

    def validation_grid(self, step: int):
        """Row 1: the instance prompt; row 2: the class prompt (language drift); then extra prompts."""
        from diffray.images import make_grid

        db, t = self.cfg.dreambooth, self.cfg.train
        rows = [self.render([p, p]) for p in (db.instance_prompt, db.class_prompt)]
        if t.validation_prompts:
            rows.append(self.render(t.validation_prompts))
        return make_grid(rows)

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        db = self.cfg.dreambooth
        card = {**card, "instance_prompt": db.instance_prompt, "class_prompt": db.class_prompt, "mode": db.mode}
        if db.mode == "lora":
            return export_lora(out_dir, self.module.unet, self.module.text_encoder, card, self.module.text_encoder_2)
        return export_pipeline(self.family, self.comps, self.module, out_dir, card)

    def export_raw(self, artifact: Path) -> None:
        if self.cfg.dreambooth.mode == "full":
            export_non_ema(self.module, artifact)
