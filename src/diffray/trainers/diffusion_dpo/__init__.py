"""Diffusion-DPO (Wallace et al., 2023): a LoRA on the UNet trained on human preference pairs, with the
frozen base as the reference policy (the LoRA switched off: no second model in memory).

Data: Parquet with Pick-a-Pic's columns (`caption`, `jpg_0`, `jpg_1`, `label_0`, optionally `label_1`;
image cells as bytes or HF `Image` structs), which `diffray data export-feedback` writes. The reader
puts each pair's preferred image first and skips pairs without a preference (ties, "both bad"); both
images get the same resize, crop and flip. The artifact is a standard LoRA dir
(`pipe.load_lora_weights` loads it).

This file declares the method (config, `METHOD`); the worker side is `task.py`, the loss
`diffray.trainers.components.dpo`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffray.config import ExportSection, LoraSection, RunSection, Section, TrainConfig
from diffray.trainers.method import Method
from diffray.trainers.pairs import PairDataSection


class DpoSection(Section):
    beta: float = Field(5000.0, gt=0, description="KL weight of Diffusion-DPO (`beta_dpo` of the paper's code, "
                        "default 5000): larger keeps the adapter closer to the base.")


class DiffusionDpoTrainConfig(TrainConfig):
    method: Literal["diffusion_dpo"] = Field("diffusion_dpo", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="diffusion-dpo"))
    data: PairDataSection = Field(default_factory=PairDataSection, description="The preference pairs.")
    dpo: DpoSection = Field(default_factory=DpoSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _formats(self) -> DiffusionDpoTrainConfig:
        plain_only = sorted({"kohya", "peft"} & set(self.export.formats))
        if plain_only and self.lora.variant not in ("lora", "rslora"):
            raise ValueError(f"export.formats {plain_only} hold plain LoRA layers only, not a {self.lora.variant} "
                             "adapter (its artifact is the format to use)")
        return self


def _task() -> type:
    from diffray.trainers.diffusion_dpo.task import DiffusionDpoTask

    return DiffusionDpoTask


METHOD = Method(name="diffusion_dpo", config=DiffusionDpoTrainConfig, task=_task)
