"""Diffusion-DPO on the shared denoising base: a LoRA (UNet, optionally text encoder) is the policy, the
same model with its adapters switched off is the reference. Each micro-batch of B pairs is one 2B-row
batch (preferred rows, then rejected rows) noised once, with the same noise and timestep for both
images of a pair (keyed by the pair's sample id); the reference pass runs without grad. Every step logs
`implicit_acc` (the pairs whose implicit reward margin is positive) and the mean `model_diff` /
`ref_diff` (preferred minus rejected denoising error); `val_loss` is the DPO loss of held-out pairs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from diffray.trainers import session
from diffray.trainers.components.diffusion import per_sample_loss
from diffray.trainers.components.dpo import DpoTerms, diffusion_dpo_loss
from diffray.trainers.denoising import DenoisingTask, Denoiser, adapters_off, export_lora_artifact, lora_denoiser


class DiffusionDpoTask(DenoisingTask):
    """Diffusion-DPO in the shared loop."""

    def __init__(self, cfg, model_path: str, env: session.WorkerEnv):
        super().__init__(cfg, model_path, env)
        self.sums = torch.zeros(4, dtype=torch.float64)  # this step's pairs, positive margins, model/ref diffs

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.lora.train_text_encoder

    def build_module(self) -> Denoiser:
        return lora_denoiser(self.comps, self.cfg.lora, self.cfg.run.seed, self.cfg.train.gradient_checkpointing)

    def loss(self, engine, step: int) -> torch.Tensor:
        terms = self.pair_terms(engine, self.next_batch("train"), step, dropout=True)
        self.sums = self.sums + torch.stack([torch.tensor(float(len(terms.inside))), (terms.inside > 0).sum().cpu(),
                                             terms.model_diff.sum().cpu(), terms.ref_diff.sum().cpu()]).double()
        return terms.loss

    def pair_terms(self, engine, batch: dict, step: int, dropout: bool) -> DpoTerms:
        """The DPO terms of a micro-batch of pairs {sample_id, pixel_values (preferred), pair_pixel_values
        (rejected), input_ids}: one noising of both images, the reference pass, then the policy's."""
        cfg, env = self.cfg, self.env
        both = {"sample_id": torch.cat([batch["sample_id"], batch["sample_id"]]),
                "pixel_values": torch.cat([batch["pixel_values"], batch["pair_pixel_values"]]),
                "input_ids": torch.cat([batch["input_ids"], batch["input_ids"]])}
        n = self.family.noised(self.comps, both, env.device, env.dtype, step, cfg.run.seed, cfg.train.noise_offset,
                              cfg.train.timestep_range)
        text = self.text_inputs(both, step, cfg.data.caption_dropout if dropout else 0.0, self.pixel_size(n.noisy))
        target = self.family.target(self.comps, n, self.prediction_type)

        def errors(pred: torch.Tensor) -> torch.Tensor:
            return per_sample_loss(pred, target, n.timesteps, self.comps.noise_scheduler, self.prediction_type,
                                   cfg.train.snr_gamma)

        with torch.no_grad(), adapters_off(self.module):
            reference = errors(self.module(n.noisy, n.timesteps, **text))
        return diffusion_dpo_loss(errors(engine(n.noisy, n.timesteps, **text)), reference, cfg.dpo.beta)

    def train_step(self, engine, step: int) -> session.StepOutput:
        """The shared step, with the pairs' implicit accuracy and mean error differences over every rank."""
        self.sums = torch.zeros(4, dtype=torch.float64)
        out = super().train_step(engine, step)
        pairs, positive, model_diff, ref_diff = session.global_sum(self.sums).tolist()
        pairs = max(pairs, 1.0)
        metrics = {"implicit_acc": positive / pairs, "model_diff": model_diff / pairs, "ref_diff": ref_diff / pairs}
        return replace(out, metrics={**out.metrics, **metrics})

    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        """The DPO loss of held-out pairs at fixed noise and timesteps, no dropout."""
        return self.pair_terms(engine, batch, session.VALIDATION_STEP, dropout=False).loss

    def export(self, out_dir: Path, card: dict) -> Path:
        return export_lora_artifact(self.module, out_dir, {**card, "dpo_beta": self.cfg.dpo.beta},
                                    self.cfg.export.formats)
