"""GPU checks (skipped without CUDA): mixed-precision LoRA on one GPU worker for each strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffray.methods import load_config
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_bf16_lora_on_one_gpu(ray_cluster, tmp_path, strategy):
    cfg = load_config(REPO / "configs" / "lora.yaml", [TINY_RANDOM,
        f"run.storage_path={tmp_path}", f"run.name=gpu-{strategy}", f"strategy.name={strategy}",
        "scaling.use_gpu=true", "scaling.num_workers=1", "train.mixed_precision=bf16", "train.max_steps=20",
        "train.checkpoint_every=20", "train.validate_every=20"])
    result = run_training(cfg)
    assert result.steps == 20 and result.loss_last_mean < result.loss_first_mean
