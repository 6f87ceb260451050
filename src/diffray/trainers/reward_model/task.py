"""The reward model in the shared loop: the trained module is a `RewardNet`; each micro-batch of B pairs
is encoded once by the frozen VAE (posterior mean) and text encoder, scored as 2B rows, and trained with
the Bradley-Terry loss. Every step logs `pair_acc` (pairs scored the right way round, over every rank);
`val_loss` is the held-out pairs' loss. The artifact is a reward-model dir (`diffray.models.reward`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from diffray.models.reward import RewardNet, bradley_terry_loss, encode_mean, pooled_text, save_reward_model
from diffray.trainers import session
from diffray.trainers.denoising import DenoisingTask


class RewardModelTask(DenoisingTask):
    """A Bradley-Terry preference model trained on pairs."""

    def __init__(self, cfg, model_path: str, env: session.WorkerEnv):
        super().__init__(cfg, model_path, env)
        self.sums = torch.zeros(2, dtype=torch.float64)  # this step's pairs, pairs ranked right

    def build_module(self) -> RewardNet:
        rm = self.cfg.reward_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)  # the same initial weights on every rank and every rerun
            return RewardNet(self.comps.vae.config.latent_channels, self.comps.text_encoder.config.hidden_size,
                             rm.channels, rm.layers)

    def pair_scores(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of a micro-batch's preferred and rejected images [B] each."""
        env = self.env
        with torch.no_grad():
            pixels = torch.cat([batch["pixel_values"], batch["pair_pixel_values"]]).to(env.device, env.dtype)
            latents = encode_mean(self.comps.vae, pixels)
            text = pooled_text(self.comps.text_encoder, batch["input_ids"].to(env.device))
        return engine(latents, torch.cat([text, text])).chunk(2)

    def loss(self, engine, step: int) -> torch.Tensor:
        loss, right = bradley_terry_loss(*self.pair_scores(engine, self.next_batch("train")))
        self.sums = self.sums + torch.tensor([float(len(right)), float(right.sum())], dtype=torch.float64)
        return loss

    def train_step(self, engine, step: int) -> session.StepOutput:
        """The shared step, with the share of pairs ranked the right way round over every rank."""
        self.sums = torch.zeros(2, dtype=torch.float64)
        out = super().train_step(engine, step)
        pairs, right = session.global_sum(self.sums).tolist()
        return replace(out, metrics={**out.metrics, "pair_acc": right / max(pairs, 1.0)})

    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        """The Bradley-Terry loss of held-out pairs."""
        return bradley_terry_loss(*self.pair_scores(engine, batch))[0]

    def validation_grid(self, step: int):
        return None  # a reward model draws nothing

    def export(self, out_dir: Path, card: dict) -> Path:
        return save_reward_model(out_dir, self.module, self.cfg.data.resolution, card)
