"""LoRA text-to-image: a PEFT LoRA adapter on the UNet's attention projections (optionally on the text
encoder too), trained on (image, caption) rows; the artifact loads with `pipe.load_lora_weights`.

This file declares the method (its config and `METHOD`); the worker side is `task.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from diffray.config import ExportSection, LoraSection, TrainConfig
from diffray.errors import ConfigError
from diffray.trainers.method import Method


class LoraTrainConfig(TrainConfig):
    method: Literal["lora"] = Field("lora", description="Training method.")
    lora: LoraSection = Field(default_factory=LoraSection)
    export: ExportSection = Field(default_factory=ExportSection)


def _task() -> type:
    from diffray.trainers.lora.task import LoraTask

    return LoraTask


def preflight(cfg: LoraTrainConfig, model_path: str) -> None:
    """A missing `lora.init_from` fails before Ray starts (its content is read, and checked, on the workers);
    so does an `export.formats` entry that cannot carry the adapter variant, rather than after training."""
    if cfg.lora.init_from and not Path(cfg.lora.init_from).expanduser().exists():
        raise ConfigError(f"{cfg.lora.init_from}: no such LoRA file or folder", field="lora.init_from")
    plain_only = sorted({"kohya", "peft"} & set(cfg.export.formats))
    if plain_only and cfg.lora.variant not in ("lora", "rslora"):
        raise ConfigError(f"export.formats {plain_only} hold plain LoRA layers only, not a {cfg.lora.variant} "
                          "adapter (its artifact is the format to use)", field="export.formats")


METHOD = Method(name="lora", config=LoraTrainConfig, task=_task, preflight=preflight)
