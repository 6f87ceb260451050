"""ControlNet: a ControlNet (initialised from the base UNet with zero convolutions, or loaded from
`controlnet.init_from`) learns to steer the frozen UNet from a control image; the artifact is a stock
`ControlNetModel` dir.

This file declares the method (config, driver checks, `METHOD`); the worker side is `task.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from diffray.config import DataSection, RunSection, Section, TrainConfig
from diffray.errors import ConfigError
from diffray.trainers.method import Method


class ControlNetSection(Section):
    init_from: str | None = Field(None, description="An existing ControlNet dir (diffusers format) to continue "
                                  "training; None initialises one from the base UNet (ControlNetModel.from_unet).")
    conditioning_scale: float = Field(1.0, ge=0.0, le=10.0, description="Scale of the ControlNet residuals in training.")
    conditioning_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability a sample trains with a blank "
                                        "(black) control image, drawn per (seed, step, sample).")
    validation_images: list[str] = Field([], description="Control images for validation grids; empty: the first "
                                         "two of the dataset (local imagefolders).")
    conditioning_embedding_out_channels: tuple[int, ...] = Field(
        (16, 32, 96, 256), min_length=2, description="Channels of the control-image encoder (from_unet only).")


def _controlnet_data() -> DataSection:
    return DataSection(path="builtin:sample/canny", conditioning_column="conditioning_image")


class ControlNetTrainConfig(TrainConfig):
    method: Literal["controlnet"] = Field("controlnet", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="controlnet-sample"))
    data: DataSection = Field(default_factory=_controlnet_data,
                              description="Paired data: data.conditioning_column names the control images.")
    controlnet: ControlNetSection = Field(default_factory=ControlNetSection)

    @model_validator(mode="after")
    def _check(self) -> ControlNetTrainConfig:
        if not self.data.conditioning_column:
            raise ValueError("data.conditioning_column: ControlNet trains on (image, control image) pairs; name the "
                             "column (e.g. conditioning_image; `diffray data condition` writes such datasets)")
        return self


def preflight(cfg: ControlNetTrainConfig, model_path: str) -> None:
    """Driver-side checks before Ray starts: the ControlNet to continue from and the validation images."""
    if cfg.controlnet.init_from and not (Path(cfg.controlnet.init_from) / "config.json").is_file():
        raise ConfigError(f"{cfg.controlnet.init_from}: not a ControlNet dir (no config.json)",
                          field="controlnet.init_from")
    for p in cfg.controlnet.validation_images:
        if not Path(p).is_file():
            raise ConfigError(f"validation image not found: {p}", field="controlnet.validation_images")


def _task() -> type:
    from diffray.trainers.controlnet.task import ControlNetTask

    return ControlNetTask


METHOD = Method(name="controlnet", config=ControlNetTrainConfig, task=_task, preflight=preflight)
