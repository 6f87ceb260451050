"""`method: vae` in the shared loop: the engine trains `KeyedAutoencoder` (the AutoencoderKL, its posterior
sample keyed by (seed, step, sample_id) as everywhere else); rank-local rows seen in training feed the
validation grid and the exported `scaling_factor` (a resumed run keeps the same rows as one without a restart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffray.models.adapters import write_card
from diffray.trainers import session
from diffray.trainers.components.diffusion import sample_latents
from diffray.trainers.steps import StepTask


class KeyedAutoencoder(torch.nn.Module):
    """encode -> posterior sample (keyed per sample and step) -> decode; returns (recon, mean, logvar)."""

    def __init__(self, vae, seed: int):
        super().__init__()
        self.vae, self.seed = vae, seed

    def forward(self, pixels: torch.Tensor, sample_ids: list[int], step: int):
        dist = self.vae.encode(pixels).latent_dist
        z = sample_latents(dist.mean, dist.std, sample_ids, step, self.seed, 1.0)
        return self.vae.decode(z).sample, dist.mean, dist.logvar


def to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


class VaeTask(StepTask):
    """See `diffray.trainers.loop.Task`."""

    def __init__(self, cfg, model_path: str, env: session.WorkerEnv):
        from diffusers import AutoencoderKL

        self.cfg, self.env = cfg, env
        vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae")
        if cfg.vae.from_scratch:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.run.seed)
                vae = AutoencoderKL.from_config(vae.config)
        vae.requires_grad_(True)
        self.module = KeyedAutoencoder(vae, cfg.run.seed).to(env.device)
        self.rows: list[torch.Tensor] = []  # training images seen here (grid, scaling factor)
        self.stream = None

    def start(self, engine, state: dict) -> None:
        # A resume reads the micro-batches it skips (the stream yields them in the same order) so that the
        # kept rows, and with them the grid and the exported scaling_factor, are those of a run without
        # the restart; the rows stay out of the trainer state (64 rows at 512 px would be ~200 MB of JSON).
        self.stream = session.data_stream("train", self.cfg, self.env)
        for _ in range(state["step"] * self.grad_accum_steps):
            self.keep_rows(next(self.stream)["pixel_values"])

    def losses(self, engine, batch: dict, step: int) -> torch.Tensor:
        """Per-sample L1 + MSE reconstruction + kl_weight x KL(posterior || N(0, I)) per latent element."""
        x = batch["pixel_values"].to(self.env.device, self.env.dtype)
        recon, mean, logvar = engine(x, [int(i) for i in batch["sample_id"]], step)
        err = recon.float() - x.float()
        dims = tuple(range(1, x.ndim))
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean(dim=tuple(range(1, mean.ndim)))
        return err.abs().mean(dims) + (err**2).mean(dims) + self.cfg.vae.kl_weight * kl

    def keep_rows(self, pixels: torch.Tensor) -> None:
        room = self.cfg.vae.scaling_samples - sum(len(r) for r in self.rows)
        if room > 0:
            self.rows.append(pixels[:room].detach().cpu())

    def next_loss(self, engine, step: int) -> torch.Tensor:
        batch = next(self.stream)
        self.keep_rows(batch["pixel_values"])
        return self.losses(engine, batch, step).mean()

    def train_step(self, engine, step: int) -> session.StepOutput:
        return session.StepOutput(session.accumulated_step(engine, step, self.grad_accum_steps,
                                                           lambda: self.next_loss(engine, step)))

    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        """Reconstruction L1 of held-out rows (posterior sample at the fixed validation key)."""
        x = batch["pixel_values"].to(self.env.device, self.env.dtype)
        recon, _, _ = engine(x, [int(i) for i in batch["sample_id"]], session.VALIDATION_STEP)
        return (recon.float() - x.float()).abs().mean()

    def validation_grid(self, step: int):
        """Originals (top) over their reconstructions from the posterior mean (bottom)."""
        from diffray.images import make_grid

        if not self.rows:
            return None
        x = torch.cat(self.rows)[: self.cfg.vae.grid_images].to(self.env.device, self.env.dtype)
        vae = self.module.vae
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        return make_grid([[to_pil(t) for t in x], [to_pil(t) for t in recon]], labels=["original", "reconstruction"])

    def scaling_factor(self) -> float:
        """1 / std of the posterior means of the kept training rows (latents of unit variance)."""
        vae = self.module.vae
        with torch.no_grad():
            means = [vae.encode(x.to(self.env.device, self.env.dtype)).latent_dist.mean.float().cpu()
                     for x in torch.cat(self.rows).split(8)]
        return float(1.0 / torch.cat(means).std())

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        vae = self.module.vae
        factor = self.scaling_factor()
        vae.register_to_config(scaling_factor=factor)
        vae.save_pretrained(out_dir, safe_serialization=True)
        rows = sum(len(r) for r in self.rows)
        write_card(out_dir, {**card, "scaling_factor": factor, "scaling_rows": rows})
        return out_dir
