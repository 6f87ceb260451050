"""The denoising methods' validation grid: a row of `train.validation_prompts`, or none when that list is
empty (it failed at the first validation step: make_grid got no image)."""

from __future__ import annotations

import torch

from diffray.methods import validate_config
from diffray.trainers.lora.task import LoraTask
from diffray.trainers.session import WorkerEnv

ENV = WorkerEnv(0, 1, torch.device("cpu"), "fp32")


def test_a_grid_per_prompt_row_and_none_without_prompts(tiny_model_path):
    train = {"validation_inference_steps": 2}
    two = LoraTask(validate_config({"method": "lora", "train": {**train, "validation_prompts": ["a red circle",
                                                                                                "a blue square"]}}),
                   tiny_model_path, ENV)
    assert two.validation_grid(1).size == (2 + 2 * (64 + 2), 2 + 64 + 2)  # two 64 px images, 2 px borders
    empty = LoraTask(validate_config({"method": "lora", "train": {**train, "validation_prompts": []}}),
                     tiny_model_path, ENV)
    assert empty.validation_grid(1) is None
